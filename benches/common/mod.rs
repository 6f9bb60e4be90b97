//! Shared by the benches: raising the open-file limit for benches that hold many sockets.

/// Raise this process's soft open-file limit towards `n` (never above the hard limit).
pub(crate) fn raise_nofile(n: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = n.min(hard);
        if want > soft {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want, hard);
        }
    }
}
