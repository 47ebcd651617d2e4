//! A counting global allocator for the peak-allocation tests, shared by
//! `protocol/tests/alloc.rs` and `kernels/tests/alloc.rs` (each test binary
//! installs it with `#[global_allocator]`).
//!
//! It measures the bytes held at the peak of one call. `realloc` counts as
//! the difference of the two sizes (the allocator may grow in place), so a
//! `Vec` that doubles is charged its capacity. The counters are per
//! thread, so a decode is charged only what its own thread allocates (the
//! decoders do not spawn threads), and measured tests also hold [`lock`]
//! so they do not run side by side.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Mutex;

pub struct Counting;

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

/// The lock that keeps measured sections apart; hold it for a whole test.
pub fn lock() -> std::sync::MutexGuard<'static, ()> {
    MEASURE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` and returns its result and the most bytes it held at once
/// beyond what was held when it started.
pub fn peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, (PEAK.with(Cell::get) - base) as usize)
}

/// A corpus file: its path relative to the corpus folder and its bytes.
pub struct Seed {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// Every file under `dir/kind`, sorted by name. Panics (the test fails)
/// when the folder is missing or holds no file, so a corpus cannot
/// silently go empty.
pub fn corpus(dir: &std::path::Path, kind: &str) -> Vec<Seed> {
    let d = dir.join(kind);
    let mut out: Vec<Seed> = std::fs::read_dir(&d)
        .unwrap_or_else(|e| panic!("corpus folder {}: {e}", d.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| Seed {
            name: format!("{kind}/{}", p.file_name().unwrap().to_string_lossy()),
            bytes: std::fs::read(&p).unwrap(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(!out.is_empty(), "corpus folder {} holds no file", d.display());
    out
}

/// Every file of every folder in `kinds`, with its folder.
pub fn corpora(dir: &std::path::Path, kinds: &[&'static str]) -> Vec<(&'static str, Seed)> {
    kinds
        .iter()
        .flat_map(|k| corpus(dir, k).into_iter().map(move |s| (*k, s)))
        .collect()
}

/// One mutation of a corpus file, as a fuzzer makes them.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// XOR the byte at this fraction of the length.
    Flip(f64, u8),
    /// Cut the file at this fraction of its length.
    Truncate(f64),
    /// Copy `len` bytes from one fraction of the file to another (repeats
    /// fields, which protobuf merges and length prefixes mis-frame).
    Splice(f64, f64, usize),
    /// Insert these bytes at this fraction of the length.
    Insert(f64, Vec<u8>),
}

fn at(f: f64, len: usize) -> usize {
    ((f * len as f64) as usize).min(len)
}

/// `bytes` with each mutation applied in turn.
pub fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match m {
            Mutation::Flip(f, x) if !bytes.is_empty() => {
                let i = at(*f, bytes.len() - 1);
                bytes[i] ^= x;
            }
            Mutation::Flip(..) => {}
            Mutation::Truncate(f) => bytes.truncate(at(*f, bytes.len())),
            Mutation::Splice(from, to, len) => {
                let from = at(*from, bytes.len());
                let end = (from + len).min(bytes.len());
                let piece = bytes[from..end].to_vec();
                let to = at(*to, bytes.len());
                bytes.splice(to..to, piece);
            }
            Mutation::Insert(f, b) => {
                let i = at(*f, bytes.len());
                bytes.splice(i..i, b.iter().copied());
            }
        }
    }
    bytes
}

/// proptest's strategy for a few mutations.
pub fn mutations() -> impl proptest::strategy::Strategy<Value = Vec<Mutation>> {
    use proptest::prelude::*;
    proptest::collection::vec(
        prop_oneof![
            4 => (0.0..1.0f64, 1u8..).prop_map(|(f, x)| Mutation::Flip(f, x)),
            1 => (0.0..1.0f64).prop_map(Mutation::Truncate),
            2 => (0.0..1.0f64, 0.0..1.0f64, 1usize..4096).prop_map(|(a, b, n)| Mutation::Splice(a, b, n)),
            2 => (0.0..1.0f64, proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(f, b)| Mutation::Insert(f, b)),
        ],
        1..6,
    )
}
