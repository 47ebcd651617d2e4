//! Peak allocation of every blob decoder on hostile input.
//!
//! A counting global allocator (this binary's own) measures the bytes held
//! at the peak of one decode, and each test asserts
//! `peak <= C * input_len + K` with [`C`] and [`K`] below: the budget the
//! decoders charge before they allocate ([`protocol::budget`], 8x the input
//! plus 4 KiB), plus slack for error messages. `realloc` counts as the
//! difference of the two sizes (the allocator may grow in place), so a
//! `Vec` that doubles is charged its capacity.
//!
//! The counters are per thread, so a decode is charged only what its own
//! thread allocates (the decoders do not spawn threads), and measured
//! tests also hold one lock so they do not run side by side.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Mutex;

use proptest::prelude::*;
use prost::Message as _;
use protocol::train::{AdapterParams, LoraShardOutput, OptimizerState, Sequences, TrainSequence};
use protocol::{ContentId, DirEntry, DirManifest, InferOutput, Outline, wire};

/// Bytes a decode may hold per input byte.
const C: usize = 8;
/// Bytes a decode may hold whatever its input: the budget's 4 KiB and
/// room for an error message.
const K: usize = 16 * 1024;

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

/// Decodes `bytes` with `decode`, asserts the peak bound, and returns
/// whether it decoded and the peak.
fn bounded<T>(name: &str, bytes: &[u8], decode: impl FnOnce(&[u8]) -> protocol::Result<T>) -> (bool, usize) {
    let (r, p) = peak(|| decode(bytes).map(drop));
    let limit = C * bytes.len() + K;
    eprintln!(
        "{name}: {} input bytes, peak {p} bytes ({:.2}x), {}",
        bytes.len(),
        p as f64 / bytes.len().max(1) as f64,
        match &r {
            Ok(()) => "decoded".to_string(),
            Err(e) => format!("refused: {e}"),
        }
    );
    assert!(p <= limit, "{name}: peak {p} > {C} * {} + {K}", bytes.len());
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
    // Each: a field whose length says 4 GiB, then a few bytes.
    let mut huge = Vec::new();
    varint(4 << 30, &mut huge);
    let claim = |tag: u32| {
        let mut b = vec![key(tag, 2)];
        b.extend(&huge);
        b.extend([0u8; 16]);
        b
    };
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
