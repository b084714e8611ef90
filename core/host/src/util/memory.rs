//! What a stage used: peak resident memory — Linux's high-water mark
//! (VmHWM), reset before a stage by writing 5 to /proc/self/clear_refs
//! (Linux ≥ 4.0), so a stage's figure is its own, not the process's peak so
//! far — and CPU time (getrusage, differenced across the stage).

/// The process's resident memory now, in bytes (VmRSS).
pub fn rss_bytes() -> Option<u64> {
    status_kb("VmRSS:").map(|kb| kb * 1024)
}

fn status_kb(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Between stages: the memory the last one freed goes back to the OS
/// (`rir_models::give_back_freed_memory`), then a new peak starts.
pub fn next_stage() -> bool {
    rir_models::give_back_freed_memory();
    reset_peak()
}

/// Starts a new peak. False where the kernel does not allow it (another OS,
/// or /proc not writable): `peak_rss_bytes` is then the process's peak.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The CPU time the process has used so far (user + system, every thread),
/// in seconds: a stage's share is the difference across it, and that over
/// its wall time says how many cores it kept busy.
pub fn cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage only writes the struct it is handed.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Some(secs(u.ru_utime) + secs(u.ru_stime))
}

/// The peak resident memory since the last `reset_peak` (or since the
/// process started), in bytes; None where /proc/self/status is not there.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kb("VmHWM:").map(|kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test (the two halves would disturb each other's figures in
    /// parallel): a 256 MB buffer touched and freed shows in the peak, and
    /// after `next_stage` the peak is back near the current size; under the
    /// trainers' allocator settings (no mmap: every buffer on the heap),
    /// freed blocks below a live one stay resident until `next_stage` hands
    /// them back.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn peaks_reset_and_freed_heap_memory_is_given_back() {
        assert!(next_stage(), "clear_refs");
        let before = peak_rss_bytes().unwrap();
        let mut v = vec![0u8; 256 << 20];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        std::hint::black_box(&v);
        let during = peak_rss_bytes().unwrap();
        assert!(during >= before + (200 << 20), "{before} -> {during}");
        drop(v);
        assert!(next_stage());
        let after = peak_rss_bytes().unwrap();
        assert!(after + (200 << 20) <= during, "peak {during} -> {after}");

        rir_models::keep_freed_memory();
        let mut blocks: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 4 << 20]).collect();
        // The last block stays: the heap's top is live, so freeing the rest
        // leaves 252 MB of free pages inside the heap.
        let keep = blocks.pop();
        drop(blocks);
        let held = rss_bytes().unwrap();
        next_stage();
        let given = rss_bytes().unwrap();
        std::hint::black_box(&keep);
        assert!(given + (150 << 20) <= held, "resident {held} -> {given}");
    }
}
