//! Giving freed heap back to the kernel. glibc keeps what a burst freed (a large controller
//! delta read and applied, a thousand blocked watchers gone) in its arenas, so RSS stays at
//! the burst's peak; [`release`] returns the free pages with `malloc_trim(0)`. Callers
//! decide when a burst has ended (the agent after a large change, the API when its
//! connections fell from a high mark). Depends on nothing else in the crate.

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
