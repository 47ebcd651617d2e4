//! How the process's allocator holds memory: large buffers mapped on their
//! own, a heap that does not give back (and fault in again) memory it is
//! about to reuse, and an explicit release of what it kept once work ends.
//! Only glibc is tuned; elsewhere these do nothing.

/// Buffers above this are mapped and unmapped on their own.
///
/// glibc otherwise raises its threshold after the first such free and
/// keeps later ones in its heap, which fragments: training a 2B4T-shaped
/// model peaked at 1.23 GB instead of 0.73 GB. The threshold sits just
/// above the 1 MiB groups a blob transfer moves (several buffers per group,
/// hundreds of groups a second): mapping each of those anew cost 256 page
/// faults and zeroed pages apiece, and with the threshold at exactly 1 MiB
/// a 1 GiB transfer over TCP ran at 261 MB/s instead of 332 MB/s.
const MMAP_THRESHOLD: usize = (1 << 20) + (1 << 18);

/// Free memory at the top of a heap that glibc keeps rather than returns.
///
/// Fixing the mmap threshold also fixes this one at its 128 KiB default,
/// so the 1 MiB transfer buffers freed at the top of a heap were returned
/// at once and faulted in again for the next group: with the default a
/// 1 GiB loopback fetch ran at 253-290 MB/s over QUIC and 399-424 MB/s over
/// TCP, with this 320-328 and 521-567. [`release_free`] gives the memory
/// back once the work is done.
const TRIM_THRESHOLD: usize = 64 << 20;

/// Sets the allocator's parameters. Call first thing in `main`, before any
/// other thread exists.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
    }
}

/// Returns the heap's free memory to the system: after a transfer or at an
/// idle daemon's periodic tick, so that what [`TRIM_THRESHOLD`] kept for
/// reuse does not stay resident.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The process's peak resident memory (`VmHWM`), where the OS reports it.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}
