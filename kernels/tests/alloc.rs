//! Peak allocation of the model and adapter file readers on hostile input.
//!
//! A counting global allocator (this binary's own) measures the bytes held
//! at the peak of one parse, and each test asserts `peak <= C * len + K`
//! for the file's length: [`GGUF_C`] and [`GGUF_K`] for GGUF (the budget
//! `GgufFile::parse` charges before it allocates), [`ST_C`] and [`ST_K`]
//! for safetensors model directories and PEFT adapters. `realloc` counts as
//! the difference of the two sizes (the allocator may grow in place), so a
//! `Vec` that doubles is charged its capacity.
//!
//! The counters are per thread, so a decode is charged only what its own
//! thread allocates (the decoders do not spawn threads), and measured
//! tests also hold one lock so they do not run side by side.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kernels::model::gguf::GgufFile;
use kernels::model::{Config, Preset};
use proptest::prelude::*;

/// Bytes a GGUF parse may hold per byte of the file, and whatever the file.
const GGUF_C: usize = 4;
const GGUF_K: usize = 128 * 1024;
/// The same for a safetensors file (and the JSON beside it).
const ST_C: usize = 8;
const ST_K: usize = 2 << 20;

struct Counting;

static MEASURE: Mutex<()> = Mutex::new(());

thread_local! {
    /// Bytes this thread holds (allocated here less freed here, so it may
    /// go below zero) and the most it held since the last reset.
    static CURRENT: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn grew(n: usize) {
    // `try_with`: the counters may be gone while a thread exits.
    let _ = CURRENT.try_with(|c| {
        let now = c.get() + n as i64;
        c.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

fn shrank(n: usize) {
    let _ = CURRENT.try_with(|c| c.set(c.get() - n as i64));
}

// SAFETY: every call is forwarded to `System` unchanged; only counters
// are updated besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on to `System`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `alloc`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The lock that keeps measured sections apart; hold it for a whole test.
fn lock() -> std::sync::MutexGuard<'static, ()> {
    MEASURE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` and returns its result and the most bytes it held at once
/// beyond what was held when it started.
fn peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, (PEAK.with(Cell::get) - base) as usize)
}

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
