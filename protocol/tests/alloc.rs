//! Peak allocation of every blob decoder on hostile input.
//!
//! A counting global allocator (`support/counting.rs`, installed in this
//! binary) measures the bytes held at the peak of one decode, and each
//! test asserts
//! `peak <= C * input_len + K` with [`C`] and [`K`] below: the budget the
//! decoders charge before they allocate ([`protocol::budget`], 8x the input
//! plus 4 KiB), plus slack for error messages.
//!
//! The committed corpus (`tests/corpus/<decoder>/`, see its README) holds
//! seed inputs for each decoder; every file is decoded under the bound, and
//! proptest mutates them as a fuzzer would (flips, cuts, repeated slices,
//! inserted bytes).

use std::path::Path;

use proptest::prelude::*;
use prost::Message as _;
use protocol::train::{AdapterParams, LoraShardOutput, OptimizerState, Sequences, TrainSequence};
use protocol::{ContentId, DirEntry, DirManifest, InferOutput, Outline, wire};

/// Bytes a decode may hold per input byte.
const C: usize = 8;
/// Bytes a decode may hold whatever its input: the budget's 4 KiB and
/// room for an error message.
const K: usize = 16 * 1024;

#[path = "support/counting.rs"]
mod counting;
use counting::{lock, mutate, mutations, peak};

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

/// Decodes `bytes` with `decode`, asserts the peak bound, and returns
/// whether it decoded and the peak.
fn bounded<T>(name: &str, bytes: &[u8], decode: impl FnOnce(&[u8]) -> protocol::Result<T>) -> (bool, usize) {
    bounded_by(name, bytes, C, decode)
}

/// [`bounded`] with `c` bytes per input byte.
fn bounded_by<T>(
    name: &str,
    bytes: &[u8],
    c: usize,
    decode: impl FnOnce(&[u8]) -> protocol::Result<T>,
) -> (bool, usize) {
    let (r, p) = peak(|| decode(bytes).map(drop));
    let limit = c * bytes.len() + K;
    eprintln!(
        "{name}: {} input bytes, peak {p} bytes ({:.2}x), {}",
        bytes.len(),
        p as f64 / bytes.len().max(1) as f64,
        match &r {
            Ok(()) => "decoded".to_string(),
            Err(e) => format!("refused: {e}"),
        }
    );
    assert!(p <= limit, "{name}: peak {p} > {c} * {} + {K}", bytes.len());
    (r.is_ok(), p)
}

fn key(tag: u32, wire_type: u8) -> u8 {
    (tag << 3) as u8 | wire_type
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field `tag`, length-delimited, whose length says 4 GiB, then a few bytes.
fn claim(tag: u32) -> Vec<u8> {
    let mut b = vec![key(tag, 2)];
    varint(4 << 30, &mut b);
    b.extend([0u8; 16]);
    b
}

/// `n` copies of the length-delimited field `tag` holding `inner`.
fn repeated(tag: u32, inner: &[u8], n: usize) -> Vec<u8> {
    let mut one = vec![key(tag, 2)];
    varint(inner.len() as u64, &mut one);
    one.extend_from_slice(inner);
    one.repeat(n)
}

/// A valid two-token sequence (the second predicted), encoded.
const TINY_SEQUENCE: [u8; 7] = [0x0a, 0x02, 0x01, 0x02, 0x12, 0x01, 0x02];

#[test]
fn a_million_two_token_sequences_decode_within_the_bound() {
    let _g = lock();
    let bytes = repeated(1, &TINY_SEQUENCE, 1 << 20);
    let (ok, _) = bounded("2^20 two-token sequences", &bytes, Sequences::decode);
    assert!(ok, "a shard at the sequence limit is valid");
    let mut over = bytes;
    over.extend(repeated(1, &TINY_SEQUENCE, 1));
    let (ok, _) = bounded("2^20 + 1 two-token sequences", &over, Sequences::decode);
    assert!(!ok);
}

#[test]
fn empty_and_oversized_sequences_are_refused_before_allocating() {
    let _g = lock();
    for (name, bytes) in [
        ("2^20 empty sequences", repeated(1, &[], 1 << 20)),
        ("2^22 empty sequences", repeated(1, &[], 1 << 22)),
        (
            "one 4 MiB targets bitmap",
            repeated(
                1,
                &[
                    [0x0a, 0x02, 0x01, 0x02, 0x12, 0x80, 0x80, 0x02].as_slice(),
                    &[0u8; 1 << 15],
                ]
                .concat(),
                128,
            ),
        ),
    ] {
        let (ok, _) = bounded(name, &bytes, Sequences::decode);
        assert!(!ok, "{name}");
    }
}

#[test]
fn lengths_that_claim_gigabytes_allocate_nothing() {
    let _g = lock();
    let (ok, p) = bounded("adapter values of 4 GiB", &claim(2), AdapterParams::decode);
    assert!(!ok && p < K);
    let (ok, _) = bounded("optimizer m of 4 GiB", &claim(3), OptimizerState::decode);
    assert!(!ok);
    let (ok, _) = bounded("shard delta of 4 GiB", &claim(2), LoraShardOutput::decode);
    assert!(!ok);
    let (ok, _) = bounded("a sequence of 4 GiB", &claim(1), Sequences::decode);
    assert!(!ok);
    let (ok, _) = bounded("a manifest entry of 4 GiB", &claim(1), DirManifest::decode);
    assert!(!ok);
    let (ok, _) = bounded("infer tokens of 4 GiB", &claim(1), InferOutput::decode);
    assert!(!ok);
    let id = ContentId::of(b"x");
    let (ok, _) = bounded("outline chaining values of 4 GiB", &claim(2), |b| {
        Outline::decode(b, &id)
    });
    assert!(!ok);
}

#[test]
fn manifests_with_the_most_entries_are_bounded() {
    let _g = lock();
    let e = |i: usize| DirEntry {
        path: format!("{i:x}"),
        id: ContentId::of(&i.to_le_bytes()),
        size: 0,
    };
    let m = DirManifest::new((0..protocol::limits::MAX_DIR_ENTRIES).map(e).collect()).unwrap();
    let (ok, _) = bounded("a manifest of the most tiny entries", &m.encode(), DirManifest::decode);
    assert!(ok);
    for (name, n) in [("2^20 empty manifest entries", 1 << 20), ("4097 empty entries", 4097)] {
        let (ok, _) = bounded(name, &repeated(1, &[], n), DirManifest::decode);
        assert!(!ok);
    }
}

#[test]
fn infer_outputs_over_the_limit_are_refused_before_allocating() {
    let _g = lock();
    let mut tokens = vec![key(1, 2)];
    varint(1 << 20, &mut tokens);
    tokens.extend(vec![1u8; 1 << 20]);
    let (ok, _) = bounded("2^20 one-byte infer tokens", &tokens, InferOutput::decode);
    assert!(!ok);
    // The same tokens unpacked: two bytes each.
    let (ok, _) = bounded(
        "2^20 unpacked infer tokens",
        &[8u8, 1].repeat(1 << 20),
        InferOutput::decode,
    );
    assert!(!ok);
    let out = InferOutput {
        tokens: (0..8192).collect(),
    };
    let (ok, _) = bounded("the most infer tokens", &out.encode(), InferOutput::decode);
    assert!(ok);
}

#[test]
fn repeated_optimizer_states_in_a_shard_output_are_bounded() {
    let _g = lock();
    // 4096 copies of an optimizer field, each with 64 moments: prost merges them.
    let state = OptimizerState {
        layout: [1; 32],
        step: 1,
        m: vec![0.5; 64],
        v: vec![0.5; 64],
    }
    .encode();
    let mut bytes = LoraShardOutput {
        layout: [1; 32],
        delta: vec![0.5; 64],
        tokens: 1,
        loss: 1.0,
        steps: 1,
        optimizer: None,
    }
    .encode();
    bytes.extend(repeated(6, &state, 4096));
    let (ok, _) = bounded("4096 merged optimizer states", &bytes, LoraShardOutput::decode);
    assert!(!ok, "merged moments do not match the delta");
}

#[test]
fn honest_blobs_round_trip_within_the_bound() {
    let _g = lock();
    let p = AdapterParams {
        layout: [3; 32],
        values: (0..100_000).map(|i| i as f32 * 1e-3).collect(),
    };
    let (back, _) = peak(|| AdapterParams::decode(&p.encode()));
    assert_eq!(back.unwrap(), p);
    bounded("an adapter of 100k values", &p.encode(), AdapterParams::decode);
    let o = LoraShardOutput {
        layout: [3; 32],
        delta: vec![0.25; 50_000],
        tokens: 9,
        loss: 0.5,
        steps: 2,
        optimizer: Some(OptimizerState {
            layout: [3; 32],
            step: 2,
            m: vec![0.1; 50_000],
            v: vec![0.2; 50_000],
        }),
    };
    assert_eq!(LoraShardOutput::decode(&o.encode()).unwrap(), o);
    bounded(
        "a shard output with its optimizer state",
        &o.encode(),
        LoraShardOutput::decode,
    );
    let s = OptimizerState::fresh([4; 32]);
    assert_eq!(OptimizerState::decode(&s.encode()).unwrap(), s);
    let data = 1u8..=255;
    let bytes: Vec<u8> = data.cycle().take(3 << 20).collect();
    let id = ContentId::of(&bytes);
    let outline = Outline::of(&bytes);
    let wire = outline.to_wire().encode_to_vec();
    let (back, _) = bounded("an outline of 3 groups", &wire, |b| Outline::decode(b, &id));
    assert!(back);
    assert_eq!(Outline::decode(&wire, &id).unwrap(), outline);
}

fn shard(seqs: &[(Vec<u32>, Vec<bool>)]) -> Sequences {
    Sequences(
        seqs.iter()
            .map(|(tokens, targets)| TrainSequence {
                tokens: tokens.clone(),
                targets: targets.clone(),
            })
            .collect(),
    )
}

/// Decodes a data shard the way the decoder did before it budgeted: prost
/// first, then the checks. The budgeted decoder must agree with it on
/// every input it accepts.
fn reference(bytes: &[u8]) -> Option<Sequences> {
    let w = wire::Sequences::decode(bytes).ok()?;
    let mut out = Vec::new();
    let mut counted = 0;
    for s in w.sequences {
        let len = s.tokens.len();
        if !(2..=protocol::limits::MAX_SEQUENCE_TOKENS).contains(&len) || s.targets.len() != len.div_ceil(8) {
            return None;
        }
        let targets: Vec<bool> = (0..len).map(|i| s.targets[i / 8] >> (i % 8) & 1 == 1).collect();
        if targets[0] || (len % 8 != 0 && s.targets[len / 8] >> (len % 8) != 0) {
            return None;
        }
        counted += targets.iter().filter(|t| **t).count();
        out.push(TrainSequence {
            tokens: s.tokens,
            targets,
        });
    }
    (counted > 0 && !out.is_empty()).then_some(Sequences(out))
}

fn sequence() -> impl Strategy<Value = (Vec<u32>, Vec<bool>)> {
    (2usize..40).prop_flat_map(|n| {
        (
            proptest::collection::vec(prop_oneof![0u32..128, any::<u32>()], n),
            proptest::collection::vec(any::<bool>(), n).prop_map(|mut t| {
                t[0] = false;
                *t.last_mut().unwrap_or(&mut false) = true;
                t
            }),
        )
    })
}

/// One `TrainSequence` encoded as prost may meet it but never writes it:
/// tokens split between packed runs and single fields, unknown fields,
/// and a target bitmap given more than once (the last counts).
fn odd_sequence() -> impl Strategy<Value = Vec<u8>> {
    (
        sequence(),
        proptest::collection::vec(0usize..4, 1..4),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|((tokens, targets), cuts, unknown, twice)| {
            let mut bits = vec![0u8; tokens.len().div_ceil(8)];
            for (i, _) in targets.iter().enumerate().filter(|(_, t)| **t) {
                bits[i / 8] |= 1 << (i % 8);
            }
            let mut b = Vec::new();
            if twice {
                b.extend([key(2, 2), 1, 0xff]);
            }
            let mut rest = tokens.as_slice();
            for cut in cuts {
                let (head, tail) = rest.split_at(cut.min(rest.len()));
                rest = tail;
                for t in head {
                    b.push(key(1, 0));
                    varint(u64::from(*t), &mut b);
                }
            }
            let mut packed = Vec::new();
            for t in rest {
                varint(u64::from(*t), &mut packed);
            }
            b.push(key(1, 2));
            varint(packed.len() as u64, &mut b);
            b.extend(packed);
            if unknown {
                b.extend([
                    key(9, 0),
                    0x96,
                    0x01,
                    key(10, 5),
                    1,
                    2,
                    3,
                    4,
                    key(11, 3),
                    key(1, 0),
                    5,
                    key(11, 4),
                ]);
            }
            b.push(key(2, 2));
            varint(bits.len() as u64, &mut b);
            b.extend(bits);
            b
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_shards_round_trip_within_the_bound(seqs in proptest::collection::vec(sequence(), 1..3000)) {
        let _g = lock();
        let s = shard(&seqs);
        let bytes = s.encode();
        let (back, p) = peak(|| Sequences::decode(&bytes));
        prop_assert_eq!(back.unwrap(), s);
        prop_assert!(p <= C * bytes.len() + K, "peak {} for {} bytes", p, bytes.len());
    }

    #[test]
    fn mutated_shards_are_bounded_and_agree_with_prost(
        seqs in proptest::collection::vec(sequence(), 1..200),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let _g = lock();
        let mut bytes = shard(&seqs).encode();
        for (at, x) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        bytes.extend(tail);
        let (got, p) = peak(|| Sequences::decode(&bytes));
        prop_assert!(p <= C * bytes.len() + K, "peak {} for {} bytes", p, bytes.len());
        prop_assert_eq!(got.ok(), reference(&bytes));
    }

    #[test]
    fn shards_in_any_encoding_agree_with_prost(seqs in proptest::collection::vec(odd_sequence(), 1..100)) {
        let _g = lock();
        let bytes: Vec<u8> = seqs.iter().flat_map(|s| repeated(1, s, 1)).collect();
        let (got, p) = peak(|| Sequences::decode(&bytes));
        prop_assert!(p <= C * bytes.len() + K, "peak {} for {} bytes", p, bytes.len());
        let want = reference(&bytes);
        prop_assert!(want.is_some());
        prop_assert_eq!(got.ok(), want);
    }

    #[test]
    fn random_blobs_are_bounded(
        bytes in proptest::collection::vec(prop_oneof![Just(0x0au8), Just(0x12), Just(0x00), Just(0x08), any::<u8>()], 0..20_000),
    ) {
        let _g = lock();
        let id = ContentId::of(b"x");
        let limit = C * bytes.len() + K;
        for (name, p) in [
            ("adapter", peak(|| AdapterParams::decode(&bytes).map(drop)).1),
            ("optimizer", peak(|| OptimizerState::decode(&bytes).map(drop)).1),
            ("shard output", peak(|| LoraShardOutput::decode(&bytes).map(drop)).1),
            ("data shard", peak(|| Sequences::decode(&bytes).map(drop)).1),
            ("manifest", peak(|| DirManifest::decode(&bytes).map(drop)).1),
            ("infer output", peak(|| InferOutput::decode(&bytes).map(drop)).1),
            ("outline", peak(|| Outline::decode(&bytes, &id).map(drop)).1),
        ] {
            prop_assert!(p <= limit, "{}: peak {} for {} bytes", name, p, bytes.len());
        }
    }
}

/// The decoders the corpus feeds, by folder name.
const KINDS: [&str; 10] = [
    "adapter",
    "optimizer",
    "shard_output",
    "sequences",
    "manifest",
    "infer_output",
    "outline",
    "advert",
    "task",
    "task_result",
];

fn corpus_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus"))
}

/// The signing key of the envelope corpora.
fn corpus_key() -> protocol::Keypair {
    protocol::Keypair::from_secret([7; 32])
}

/// What `kind`'s decoder makes of `bytes`, with its peak charged against
/// the bound. Outline files hold the blob's 32-byte id, then the outline;
/// envelope payload files (advert, task, task_result) are the payload,
/// sealed here so that the payload decoder is reached past the signature.
/// The bound then applies to the whole envelope, with one more byte per
/// byte: the envelope body is held while its payload decodes.
fn decode_kind(kind: &str, name: &str, bytes: &[u8]) -> (bool, usize) {
    match kind {
        "adapter" => bounded(name, bytes, AdapterParams::decode),
        "optimizer" => bounded(name, bytes, OptimizerState::decode),
        "shard_output" => bounded(name, bytes, LoraShardOutput::decode),
        "sequences" => bounded(name, bytes, Sequences::decode),
        "manifest" => bounded(name, bytes, DirManifest::decode),
        "infer_output" => bounded(name, bytes, InferOutput::decode),
        "outline" => {
            let (id, rest) = bytes.split_at(bytes.len().min(32));
            let mut raw = [0u8; 32];
            raw[..id.len()].copy_from_slice(id);
            let id = ContentId::from_bytes(raw);
            bounded(name, rest, |b| Outline::decode(b, &id))
        }
        "advert" | "task" | "task_result" => {
            let kind = match kind {
                "advert" => wire::PayloadKind::Advert,
                "task" => wire::PayloadKind::Task,
                _ => wire::PayloadKind::TaskResult,
            };
            let sealed = protocol::envelope::seal_bytes(
                &corpus_key(),
                kind as i32,
                bytes.to_vec(),
                protocol::Validity::new(1, 0, 1000),
            );
            bounded_by(name, &sealed, C + 1, protocol::open)
        }
        _ => panic!("no decoder for corpus folder {kind}"),
    }
}

#[test]
fn every_corpus_file_decodes_within_the_bound() {
    let _g = lock();
    let mut decoded = 0;
    for kind in KINDS {
        let seeds = counting::corpus(corpus_dir(), kind);
        let mut ok = 0;
        for s in &seeds {
            ok += usize::from(decode_kind(kind, &s.name, &s.bytes).0);
        }
        // Each folder holds honest seeds (which decode) besides hostile ones.
        assert!(ok > 0, "no file in corpus/{kind} decodes");
        decoded += ok;
    }
    eprintln!("{decoded} corpus files decoded");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mutated_corpus_files_are_bounded(pick in any::<prop::sample::Index>(), m in mutations()) {
        let _g = lock();
        let seeds = counting::corpora(corpus_dir(), &KINDS);
        let (kind, seed) = &seeds[pick.index(seeds.len())];
        let bytes = mutate(seed.bytes.clone(), &m);
        decode_kind(kind, &format!("{} mutated", seed.name), &bytes);
    }
}

/// Writes the seed files of the corpus (the hostile and the honest inputs
/// the tests above build, small). Run it after a format change:
/// `cargo test -p tern-protocol --test alloc -- --ignored write_corpus`.
/// Inputs a failure turned up are added beside them by hand.
#[test]
#[ignore = "writes tests/corpus; run by hand"]
fn write_corpus() {
    let state = OptimizerState {
        layout: [1; 32],
        step: 3,
        m: vec![0.5; 64],
        v: vec![0.25; 64],
    };
    let output = LoraShardOutput {
        layout: [1; 32],
        delta: (0..64).map(|i| i as f32 * 0.01).collect(),
        tokens: 100,
        loss: 2.5,
        steps: 2,
        optimizer: Some(state.clone()),
    };
    let mut merged = LoraShardOutput {
        optimizer: None,
        ..output.clone()
    }
    .encode();
    merged.extend(repeated(6, &state.encode(), 64));
    let seqs = shard(&[
        (vec![1, 2, 3, 4], vec![false, true, true, true]),
        (vec![5, 6], vec![false, true]),
        ((0..300).collect(), (0..300).map(|i| i % 3 == 1).collect()),
    ]);
    let entries = |n: usize| {
        DirManifest::new(
            (0..n)
                .map(|i| DirEntry {
                    path: format!("dir/file{i}.bin"),
                    id: ContentId::of(&i.to_le_bytes()),
                    size: i as u64 * 1000,
                })
                .collect(),
        )
        .unwrap()
        .encode()
    };
    let blob: Vec<u8> = (1u8..=255).cycle().take(3 << 20).collect();
    let outline = |b: &[u8]| {
        [
            ContentId::of(b).as_bytes().as_slice(),
            &Outline::of(b).to_wire().encode_to_vec(),
        ]
        .concat()
    };
    let advert = wire::Advert {
        version: "0.1.0".into(),
        listen_addrs: vec![
            "/ip4/192.0.2.1/udp/4001/quic-v1".into(),
            "/ip4/192.0.2.1/tcp/4001".into(),
        ],
        cpu: Some(wire::Cpu {
            threads: 8,
            arch: "x86_64".into(),
            features: vec!["avx2".into(), "avx512vnni".into()],
        }),
        models: vec![vec![3; 32]],
        power: 1,
        ..Default::default()
    };
    let task = |params| wire::Task {
        kind: match &params {
            wire::task::Params::Infer(_) => wire::TaskKind::Infer,
            wire::task::Params::LoraShard(_) => wire::TaskKind::LoraShard,
        } as i32,
        worker: corpus_key().public().as_bytes().to_vec(),
        inputs: vec![vec![3; 32], vec![4; 32], vec![5; 32], vec![6; 32]],
        max_work: 100_000,
        params: Some(params),
    };
    let infer = task(wire::task::Params::Infer(wire::InferParams {
        model: vec![3; 32],
        prompt: vec![1, 72, 101, 108, 108, 111],
        max_tokens: 32,
        sampling: Some(wire::Sampling {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            seed: 1,
        }),
    }));
    let shard_task = task(wire::task::Params::LoraShard(wire::LoraShardParams {
        model: vec![3; 32],
        adapter: vec![4; 32],
        data: vec![5; 32],
        local_steps: 2,
        seed: 9,
        hyper: Some(wire::LoraHyper {
            rank: 4,
            alpha: 8.0,
            targets: 0b11,
            lr: 1e-3,
            batch: 2,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            dropout: 0.0,
        }),
        optimizer: vec![6; 32],
    }));
    let result = wire::TaskResult {
        task: vec![6; 32],
        inputs: vec![vec![3; 32], vec![4; 32]],
        status: wire::TaskStatus::Done as i32,
        output: vec![7; 32],
        work: 1234,
        error: String::new(),
    };
    let files: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "adapter",
            "honest_1k.bin",
            AdapterParams {
                layout: [3; 32],
                values: (0..1000).map(|i| i as f32 * 1e-3).collect(),
            }
            .encode(),
        ),
        ("adapter", "claims_4gib.bin", claim(2)),
        ("optimizer", "honest.bin", state.encode()),
        ("optimizer", "fresh.bin", OptimizerState::fresh([4; 32]).encode()),
        ("optimizer", "claims_4gib.bin", claim(3)),
        ("shard_output", "honest.bin", output.encode()),
        ("shard_output", "merged_optimizers.bin", merged),
        ("shard_output", "claims_4gib.bin", claim(2)),
        ("sequences", "honest.bin", seqs.encode()),
        ("sequences", "tiny_4k.bin", repeated(1, &TINY_SEQUENCE, 4096)),
        ("sequences", "empty_4k.bin", repeated(1, &[], 4096)),
        ("sequences", "claims_4gib.bin", claim(1)),
        ("manifest", "honest_8.bin", entries(8)),
        ("manifest", "empty_4097.bin", repeated(1, &[], 4097)),
        ("manifest", "claims_4gib.bin", claim(1)),
        (
            "infer_output",
            "honest.bin",
            InferOutput {
                tokens: (0..200).collect(),
            }
            .encode(),
        ),
        ("infer_output", "unpacked_9000.bin", [8u8, 1].repeat(9000)),
        ("infer_output", "claims_4gib.bin", claim(1)),
        ("outline", "honest_3_groups.bin", outline(&blob)),
        ("outline", "honest_small.bin", outline(b"a small blob")),
        ("outline", "claims_4gib.bin", [[0u8; 32].as_slice(), &claim(2)].concat()),
        ("advert", "honest.bin", advert.encode_to_vec()),
        ("advert", "many_addrs.bin", repeated(2, b"/ip4/1.2.3.4/tcp/1", 400)),
        ("advert", "empty_gpus_4k.bin", repeated(4, &[], 4096)),
        ("task", "infer.bin", infer.encode_to_vec()),
        ("task", "lora_shard.bin", shard_task.encode_to_vec()),
        ("task", "empty_inputs_4k.bin", repeated(3, &[], 4096)),
        ("task_result", "done.bin", result.encode_to_vec()),
        ("task_result", "empty_inputs_4k.bin", repeated(2, &[], 4096)),
    ];
    for (kind, name, bytes) in files {
        let dir = corpus_dir().join(kind);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
