//! Peak allocation of the model and adapter file readers on hostile input.
//!
//! A counting global allocator (`protocol/tests/support/counting.rs`,
//! installed in this binary) measures the bytes held at the peak of one
//! parse, and each test asserts `peak <= C * len + K`
//! for the file's length: [`GGUF_C`] and [`GGUF_K`] for GGUF (the budget
//! `GgufFile::parse` charges before it allocates), [`ST_C`] and [`ST_K`]
//! for safetensors model directories and PEFT adapters.
//!
//! The committed corpus (`tests/corpus/`, see its README) holds seed files
//! for each reader; every file is read under the bound, and proptest
//! mutates them as a fuzzer would (flips, cuts, repeated slices, inserted
//! bytes).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kernels::model::gguf::GgufFile;
use kernels::model::{Config, Preset};
use proptest::prelude::*;

/// Bytes a GGUF parse may hold per byte of the file, and whatever the file.
const GGUF_C: usize = 4;
const GGUF_K: usize = 128 * 1024;
/// The same for a safetensors file (and the JSON beside it).
const ST_C: usize = 8;
const ST_K: usize = 2 << 20;

#[path = "../../protocol/tests/support/counting.rs"]
mod counting;
use counting::{lock, mutate, mutations, peak};

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

fn report<T, E: std::fmt::Display>(name: &str, len: usize, p: usize, r: &Result<T, E>) {
    eprintln!(
        "{name}: {len} input bytes, peak {p} bytes ({:.2}x), {}",
        p as f64 / len.max(1) as f64,
        match r {
            Ok(_) => "parsed".to_string(),
            Err(e) => format!("refused: {e}"),
        }
    );
}

/// Parses `bytes` as GGUF, asserts the peak bound, and returns whether it
/// parsed.
fn gguf(name: &str, bytes: Vec<u8>) -> bool {
    let len = bytes.len();
    let shared: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(bytes);
    let (r, p) = peak(|| GgufFile::parse(shared.clone(), name).map(drop));
    report(name, len, p, &r);
    assert!(
        p <= GGUF_C * len + GGUF_K,
        "{name}: peak {p} > {GGUF_C} * {len} + {GGUF_K}"
    );
    r.is_ok()
}

/// GGUF bytes written by hand, so hostile layouts are easy to make.
struct Gguf(Vec<u8>);

impl Gguf {
    fn new(tensors: u64, kv: u64) -> Self {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(tensors.to_le_bytes());
        b.extend(kv.to_le_bytes());
        Self(b)
    }

    fn u32(mut self, v: u32) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }

    fn u64(mut self, v: u64) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }

    fn str(self, s: &str) -> Self {
        let mut g = self.u64(s.len() as u64);
        g.0.extend_from_slice(s.as_bytes());
        g
    }

    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }

    /// A key and the header of an array of `n` items of type `item`.
    fn array(self, key: &str, item: u32, n: u64) -> Self {
        self.str(key).u32(9).u32(item).u64(n)
    }
}

#[test]
fn one_huge_u8_array() {
    let _g = lock();
    let n = 4 << 20;
    let f = Gguf::new(0, 1).array("big", 0, n).raw(&vec![7u8; n as usize]);
    assert!(gguf("a GGUF whose metadata is one 4 MiB U8 array", f.0));
    let f = Gguf::new(0, 1).array("big", 7, n).raw(&vec![1u8; n as usize]);
    assert!(gguf("a GGUF whose metadata is one 4 MiB bool array", f.0));
    let f = Gguf::new(0, 1).array("big", 5, n / 4).raw(&vec![1u8; n as usize]);
    assert!(gguf("a GGUF whose metadata is one 4 MiB I32 array", f.0));
}

#[test]
fn counts_larger_than_the_file() {
    let _g = lock();
    assert!(!gguf(
        "2^20 metadata entries in a 24-byte file",
        Gguf::new(0, 1 << 20).0
    ));
    assert!(!gguf("2^20 tensors in a 24-byte file", Gguf::new(1 << 20, 0).0));
    let claim = Gguf::new(0, 1).u64(4 << 30).raw(b"key");
    assert!(!gguf("a key claiming 4 GiB", claim.0));
    let claim = Gguf::new(0, 1).array("a", 0, 4 << 30).raw(&[0; 64]);
    assert!(!gguf("an array claiming 4 GiB", claim.0));
    let claim = Gguf::new(0, 1).array("a", 8, 1 << 20).raw(&[0; 64 << 10]);
    assert!(!gguf("2^20 strings in 64 KiB", claim.0));
    let claim = Gguf::new(0, 1).array("a", 9, 1 << 20).raw(&[0; 64 << 10]);
    assert!(!gguf("2^20 arrays in 64 KiB", claim.0));
}

#[test]
fn arrays_of_empty_strings_and_of_arrays() {
    let _g = lock();
    let n = 1 << 18;
    let f = Gguf::new(0, 1).array("s", 8, n).raw(&vec![0u8; 8 * n as usize]);
    assert!(gguf("2^18 empty strings", f.0));
    let mut f = Gguf::new(0, 1).array("nested", 9, n);
    for _ in 0..n {
        f = f.u32(0).u64(0);
    }
    assert!(gguf("2^18 empty nested arrays", f.0));
    let mut f = Gguf::new(0, 1).array("nested", 9, n);
    for _ in 0..n {
        f = f.u32(0).u64(2).raw(&[1, 2]);
    }
    assert!(gguf("2^18 nested U8 arrays of 2", f.0));
    let deep = Gguf::new(0, 1)
        .array("deep", 9, 1)
        .u32(9)
        .u64(1)
        .u32(9)
        .u64(1)
        .u32(0)
        .u64(0);
    assert!(!gguf("arrays nested three deep", deep.0));
}

#[test]
fn many_tiny_entries_and_tensors() {
    let _g = lock();
    // One-character keys: 14 bytes in the file and 57 in memory, over the
    // budget, so refused; keys as long as real ones parse.
    let n = 1u64 << 17;
    let mut f = Gguf::new(0, n);
    for i in 0..n {
        f = f.str(&format!("{:x}", i % 16)).u32(0).raw(&[1]);
    }
    assert!(!gguf("2^17 one-byte metadata entries", f.0));
    let mut f = Gguf::new(0, n);
    for i in 0..n {
        f = f.str(&format!("general.k{i:x}")).u32(0).raw(&[1]);
    }
    assert!(gguf("2^17 metadata entries with real keys", f.0));
    let n = 1u64 << 16;
    let mut f = Gguf::new(n, 0);
    for i in 0..n {
        f = f.str(&format!("{i:x}")).u32(1).u64(1).u32(0).u64(0);
    }
    let pad = (32 - f.0.len() % 32) % 32;
    f = f.raw(&vec![0; pad + 32]);
    assert!(gguf("2^16 one-element tensors", f.0));
}

/// A metadata value of a random type, written in GGUF's layout.
fn value() -> impl Strategy<Value = (u32, Vec<u8>)> {
    let scalar = prop_oneof![
        (0u32..8).prop_filter("not a string", |t| *t != 7),
        Just(10u32),
        Just(11u32),
        Just(12u32)
    ];
    let width = |t: u32| match t {
        0 | 1 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        _ => 8,
    };
    prop_oneof![
        scalar.clone().prop_map(move |t| (t, vec![3u8; width(t)])),
        Just((7u32, vec![1u8])),
        ".{0,12}".prop_map(|s: String| (8u32, [(s.len() as u64).to_le_bytes().as_slice(), s.as_bytes()].concat())),
        (scalar, 0usize..4000).prop_map(move |(t, n)| {
            let mut b = t.to_le_bytes().to_vec();
            b.extend((n as u64).to_le_bytes());
            b.extend(vec![0u8; n * width(t)]);
            (9u32, b)
        }),
        proptest::collection::vec("[a-z]{0,6}", 0..400).prop_map(|v| {
            let mut b = 8u32.to_le_bytes().to_vec();
            b.extend((v.len() as u64).to_le_bytes());
            for s in &v {
                b.extend((s.len() as u64).to_le_bytes());
                b.extend(s.as_bytes());
            }
            (9u32, b)
        }),
    ]
}

fn file(kvs: &[(String, (u32, Vec<u8>))]) -> Vec<u8> {
    let mut f = Gguf::new(0, kvs.len() as u64);
    for (k, (t, v)) in kvs {
        f = f.str(k).u32(*t).raw(v);
    }
    f.0
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_metadata_parses_within_the_bound(kvs in proptest::collection::vec(("[a-z.]{1,20}", value()), 0..200)) {
        let _g = lock();
        prop_assert!(gguf("random metadata", file(&kvs)));
    }

    #[test]
    fn mutated_metadata_is_bounded(
        kvs in proptest::collection::vec(("[a-z.]{1,20}", value()), 1..60),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let _g = lock();
        let mut b = file(&kvs);
        for (at, x) in flips {
            let i = at.index(b.len());
            b[i] ^= x;
        }
        gguf("mutated metadata", b);
    }
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tern-alloc-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A safetensors file of `header` JSON and `data` bytes.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend(data);
    b
}

/// Hostile safetensors headers of about `n` bytes.
fn hostile_headers(n: usize) -> Vec<(&'static str, String)> {
    let entries = n / 8;
    let mut meta = String::from("{\"__metadata__\":{");
    for i in 0..entries {
        if i > 0 {
            meta.push(',');
        }
        meta.push_str(&format!("\"{i:x}\":\"\""));
    }
    meta.push_str("}}");
    let mut shape = String::from("{\"t\":{\"dtype\":\"F32\",\"shape\":[0");
    shape.push_str(&",0".repeat(n / 2));
    shape.push_str("],\"data_offsets\":[0,0]}}");
    let mut tensors = String::from("{");
    for i in 0..n / 48 {
        if i > 0 {
            tensors.push(',');
        }
        tensors.push_str(&format!(
            "\"{i:x}\":{{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}"
        ));
    }
    tensors.push('}');
    vec![
        ("tiny metadata entries", meta),
        ("a shape of many zeros", shape),
        ("many empty tensors", tensors),
    ]
}

fn write_peft(dir: &Path, config: &str, weights: &[u8]) {
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
}

const PEFT_CONFIG: &str = r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj"]}"#;

#[test]
fn hostile_safetensors_headers_are_bounded() {
    let _g = lock();
    let model = Config::preset(Preset::Tiny);
    let dir = tempdir("peft");
    let hf = tempdir("hf");
    for (name, header) in hostile_headers(4 << 20) {
        let bytes = safetensors(&header, &[]);
        let len = bytes.len() + PEFT_CONFIG.len();
        write_peft(&dir, PEFT_CONFIG, &bytes);
        let (r, p) = peak(|| kernels::train::peft::load_peft(&dir, &model).map(drop));
        report(&format!("PEFT adapter: {name}"), len, p, &r);
        assert!(r.is_err());
        assert!(p <= ST_C * len + ST_K, "{name}: peak {p}");
        std::fs::write(hf.join("model.safetensors"), &bytes).unwrap();
        let (r, p) = peak(|| kernels::model::tensor_table(&hf).map(drop));
        report(&format!("model safetensors: {name}"), bytes.len(), p, &r);
        assert!(p <= ST_C * bytes.len() + ST_K, "{name}: peak {p}");
    }
    // A config that is one deep JSON array.
    let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
    let wide = format!("[{}0]", "0,".repeat(4 << 20));
    for (name, config) in [("a deep config", deep), ("a wide config", wide)] {
        write_peft(&dir, &config, &safetensors("{}", &[]));
        let (r, p) = peak(|| kernels::train::peft::load_peft(&dir, &model).map(drop));
        report(&format!("PEFT adapter: {name}"), config.len(), p, &r);
        assert!(r.is_err());
        assert!(p <= ST_C * config.len() + ST_K, "{name}: peak {p}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&hf).unwrap();
}

/// Structural tokens of a JSON text, as the readers count them.
fn tokens(json: &str) -> usize {
    let (mut n, mut in_string, mut escaped) = (0, false, false);
    for b in json.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if matches!(b, b',' | b':' | b'[' | b'{') {
            n += 1;
        } else if b == b'"' {
            in_string = true;
        }
    }
    n
}

/// Heap the readers charge parsing a JSON header: per structural token and
/// per byte (kept in step with `kernels/src/model/hf.rs`).
const JSON_PER_TOKEN: usize = 128;
const JSON_PER_BYTE: usize = 4;

#[test]
fn accepted_hostile_headers_cost_what_they_are_charged() {
    let _g = lock();
    let hf = tempdir("charged");
    for (name, header) in hostile_headers(256 << 10) {
        // Enough tensor data beside the header that the file passes the check.
        let charge = JSON_PER_TOKEN * tokens(&header) + JSON_PER_BYTE * header.len();
        let pad = charge / 4;
        let header = format!(
            "{},\"pad\":{{\"dtype\":\"U8\",\"shape\":[{pad}],\"data_offsets\":[0,{pad}]}}}}",
            &header[..header.len() - 1]
        );
        let charge = JSON_PER_TOKEN * tokens(&header) + JSON_PER_BYTE * header.len();
        let bytes = safetensors(&header, &vec![0; pad]);
        std::fs::write(hf.join("model.safetensors"), &bytes).unwrap();
        let (r, p) = peak(|| kernels::model::tensor_table(&hf).map(drop));
        report(&format!("model safetensors, data beside: {name}"), bytes.len(), p, &r);
        assert!(r.is_ok(), "{name}");
        assert!(
            p <= charge,
            "{name}: parsing took {p} bytes, more than the {charge} charged"
        );
        assert!(p <= ST_C * bytes.len() + ST_K, "{name}: peak {p}");
    }
    std::fs::remove_dir_all(&hf).unwrap();
}

#[test]
fn a_header_length_claiming_4_gib_allocates_nothing() {
    let _g = lock();
    let model = Config::preset(Preset::Tiny);
    let dir = tempdir("claim");
    let mut bytes = (4u64 << 30).to_le_bytes().to_vec();
    bytes.extend(b"{}");
    write_peft(&dir, PEFT_CONFIG, &bytes);
    let (r, p) = peak(|| kernels::train::peft::load_peft(&dir, &model).map(drop));
    report("a safetensors header claiming 4 GiB", bytes.len(), p, &r);
    assert!(r.is_err() && p < 64 << 10, "peak {p}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_tensor_whose_shape_does_not_fit_is_refused_before_its_values_are_read() {
    let _g = lock();
    let model = Config::preset(Preset::Tiny);
    let dir = tempdir("shape");
    // 4 MiB of F16 values for `q_proj.lora_A`, whose shape is wrong for the model.
    let n = 2 << 20;
    let header = format!(
        "{{\"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight\":{{\"dtype\":\"F16\",\"shape\":[1,{n}],\"data_offsets\":[0,{}]}}}}",
        2 * n
    );
    let bytes = safetensors(&header, &vec![0u8; 2 * n]);
    write_peft(&dir, PEFT_CONFIG, &bytes);
    let (r, p) = peak(|| kernels::train::peft::load_peft(&dir, &model).map(drop));
    report("a mis-shaped F16 tensor of 4 MiB", bytes.len(), p, &r);
    assert!(r.is_err());
    // Reading the file is one copy; widening the tensor to f32 would be two more.
    assert!(p <= bytes.len() + (1 << 20), "peak {p}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn corpus_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus"))
}

/// The readers the corpus feeds, by folder name.
const KINDS: [&str; 3] = ["gguf", "safetensors", "peft_config"];

/// The PEFT adapter the corpus pairs with its configs and weights.
fn honest_peft() -> (Vec<u8>, Vec<u8>) {
    let dir = corpus_dir();
    (
        std::fs::read(dir.join("peft_config/honest.json")).unwrap(),
        std::fs::read(dir.join("safetensors/peft_honest.safetensors")).unwrap(),
    )
}

/// Reads `bytes` as a file of `kind` under the bound, and returns whether
/// it was accepted: a GGUF file; a safetensors file, both as a model's
/// `model.safetensors` and as the weights of a PEFT adapter with the
/// corpus's honest config; a PEFT config, with the honest weights.
fn read_kind(kind: &str, name: &str, bytes: &[u8], scratch: &Path) -> bool {
    let model = Config::preset(Preset::Tiny);
    let peft = |config: &[u8], weights: &[u8], what: &str| {
        std::fs::write(scratch.join("adapter_config.json"), config).unwrap();
        std::fs::write(scratch.join("adapter_model.safetensors"), weights).unwrap();
        let len = config.len() + weights.len();
        let (r, p) = peak(|| kernels::train::peft::load_peft(scratch, &model).map(drop));
        report(what, len, p, &r);
        assert!(p <= ST_C * len + ST_K, "{what}: peak {p}");
        r.is_ok()
    };
    match kind {
        "gguf" => gguf(name, bytes.to_vec()),
        "safetensors" => {
            std::fs::write(scratch.join("model.safetensors"), bytes).unwrap();
            let (r, p) = peak(|| kernels::model::tensor_table(scratch).map(drop));
            report(&format!("{name} as a model"), bytes.len(), p, &r);
            assert!(p <= ST_C * bytes.len() + ST_K, "{name}: peak {p}");
            std::fs::remove_file(scratch.join("model.safetensors")).unwrap();
            let table = r.is_ok();
            peft(&honest_peft().0, bytes, &format!("{name} as PEFT weights")) || table
        }
        "peft_config" => peft(bytes, &honest_peft().1, name),
        _ => panic!("no reader for corpus folder {kind}"),
    }
}

#[test]
fn every_corpus_file_is_read_within_the_bound() {
    let _g = lock();
    let scratch = tempdir("corpus");
    for kind in KINDS {
        let seeds = counting::corpus(corpus_dir(), kind);
        let ok = seeds
            .iter()
            .filter(|s| read_kind(kind, &s.name, &s.bytes, &scratch))
            .count();
        // Each folder holds honest seeds (which are read) besides hostile ones.
        assert!(ok > 0, "no file in corpus/{kind} is read");
    }
    std::fs::remove_dir_all(&scratch).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn mutated_corpus_files_are_bounded(pick in any::<prop::sample::Index>(), m in mutations()) {
        let _g = lock();
        let seeds = counting::corpora(corpus_dir(), &KINDS);
        let (kind, seed) = &seeds[pick.index(seeds.len())];
        let scratch = tempdir("mutated");
        read_kind(kind, &format!("{} mutated", seed.name), &mutate(seed.bytes.clone(), &m), &scratch);
        std::fs::remove_dir_all(&scratch).unwrap();
    }
}

/// Writes the seed files of the corpus (small forms of the hostile files
/// above, and honest files the readers accept). Run it after a format
/// change: `cargo test -p tern-kernels --test alloc -- --ignored write_corpus`.
/// Inputs a failure turned up are added beside them by hand.
#[test]
#[ignore = "writes tests/corpus; run by hand"]
fn write_corpus() {
    use kernels::train::{Adapter, LoraConfig};
    let model = Config::preset(Preset::Tiny);
    let lora = LoraConfig::new(2, 4.0, 0.0, &[kernels::model::Proj::Q, kernels::model::Proj::Down]).unwrap();
    let adapter = Adapter::init(lora, &model, 5).unwrap();
    let scratch = tempdir("write");
    kernels::train::peft::save_peft(&adapter, &scratch, Some("ab12"), Some("tiny")).unwrap();
    kernels::train::peft::save_gguf(&adapter, &scratch.join("adapter.gguf"), "bitnet").unwrap();
    let read = |f: &str| std::fs::read(scratch.join(f)).unwrap();
    let n = 4096u64;
    let mut nested = Gguf::new(0, 1).array("nested", 9, 64);
    for _ in 0..64 {
        nested = nested.u32(0).u64(2).raw(&[1, 2]);
    }
    let mut tiny_keys = Gguf::new(0, 512);
    for i in 0..512 {
        tiny_keys = tiny_keys.str(&format!("{:x}", i % 16)).u32(0).raw(&[1]);
    }
    let mut tensors = Gguf::new(64, 1).str("general.architecture").u32(8).str("bitnet");
    for i in 0..64 {
        tensors = tensors.str(&format!("t{i:x}")).u32(1).u64(1).u32(0).u64(0);
    }
    let pad = (32 - tensors.0.len() % 32) % 32;
    tensors = tensors.raw(&vec![0; pad + 32]);
    let mut files: Vec<(&str, String, Vec<u8>)> = vec![
        ("gguf", "adapter.gguf".into(), read("adapter.gguf")),
        ("gguf", "tensors_64.gguf".into(), tensors.0),
        (
            "gguf",
            "u8_array.gguf".into(),
            Gguf::new(0, 1).array("big", 0, n).raw(&vec![7u8; n as usize]).0,
        ),
        (
            "gguf",
            "strings.gguf".into(),
            Gguf::new(0, 1).array("s", 8, 512).raw(&[0u8; 8 * 512]).0,
        ),
        ("gguf", "nested_arrays.gguf".into(), nested.0),
        ("gguf", "tiny_keys.gguf".into(), tiny_keys.0),
        ("gguf", "entries_claim.gguf".into(), Gguf::new(0, 1 << 20).0),
        (
            "gguf",
            "key_claims_4gib.gguf".into(),
            Gguf::new(0, 1).u64(4 << 30).raw(b"key").0,
        ),
        (
            "gguf",
            "array_claims_4gib.gguf".into(),
            Gguf::new(0, 1).array("a", 0, 4 << 30).raw(&[0; 64]).0,
        ),
        (
            "safetensors",
            "peft_honest.safetensors".into(),
            read("adapter_model.safetensors"),
        ),
        ("safetensors", "header_claims_4gib.safetensors".into(), {
            let mut b = (4u64 << 30).to_le_bytes().to_vec();
            b.extend(b"{}");
            b
        }),
        ("safetensors", "empty.safetensors".into(), safetensors("{}", &[])),
        ("peft_config", "honest.json".into(), read("adapter_config.json")),
        ("peft_config", "minimal.json".into(), PEFT_CONFIG.as_bytes().to_vec()),
        (
            "peft_config",
            "deep.json".into(),
            format!("{}{}", "[".repeat(100), "]".repeat(100)).into_bytes(),
        ),
        (
            "peft_config",
            "wide.json".into(),
            format!("[{}0]", "0,".repeat(2048)).into_bytes(),
        ),
    ];
    for (name, header) in hostile_headers(16 << 10) {
        files.push((
            "safetensors",
            format!("{}.safetensors", name.replace(' ', "_")),
            safetensors(&header, &[]),
        ));
    }
    for (kind, name, bytes) in files {
        let dir = corpus_dir().join(kind);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    std::fs::remove_dir_all(&scratch).unwrap();
}
