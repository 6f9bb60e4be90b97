//! Giving freed heap back to the kernel. glibc keeps what a burst freed (a large controller
//! delta read and applied, a thousand blocked watchers gone) in its arenas, so RSS stays at
//! the burst's peak; [`release`] returns the free pages with `malloc_trim(0)`. Callers
//! decide when a burst has ended (the agent after a large change, the API when its
//! connections fell from a high mark). Depends on nothing else in the crate.

/// Blocks of at least this size are mapped on their own and unmapped when freed.
pub const MMAP_THRESHOLD: usize = 256 * 1024;

/// Fix glibc's mmap threshold at [`MMAP_THRESHOLD`] (call once, before other threads start).
/// Left alone, glibc raises it to the largest block freed so far (up to 32 MiB), so after the
/// first large delta the next ones' buffers (a body, a plan's operations, the prober's
/// targets) come from the arenas and, freed, leave pages that a trim cannot return among the
/// blocks that stay: 50-100 bytes per backend of a 100,000-backend agent, differing from
/// run to run.
pub fn configure() {
    set_mmap_threshold();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_mmap_threshold() {
    let bytes = libc::c_int::try_from(MMAP_THRESHOLD).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt takes two integers and only sets glibc's own tuning; called before any
    // other thread allocates.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_mmap_threshold() {}

/// Return free heap pages to the kernel. Blocking (milliseconds for a heap of hundreds of
/// MiB, arena locks taken one at a time): call it on a blocking thread after the burst.
pub fn release() {
    trim();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: malloc_trim takes no pointer and only rearranges glibc's own free lists; it is
    // safe to call from any thread at any time (it locks each arena it walks).
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
