//! The host facts the kernel path needs: this network namespace's cookie, a BPF filesystem
//! and a cgroup2 mount (found, or mounted where there is none: `ip netns exec` remounts `/sys`,
//! so an agent started that way sees neither).
//!
//! The kernel path's two `unsafe` calls live here, neither wrapped by nix, socket2 or aya:
//! `getsockopt(SO_NETNS_COOKIE)`, which writes at most `size_of::<u64>()` bytes into a `u64` we
//! own, with the length passed alongside; and `bpf(BPF_MAP_LOOKUP_BATCH)` on an array map,
//! which writes at most `count` keys and values into buffers sized for `count`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;
/// `SO_NETNS_COOKIE` from `asm-generic/socket.h` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace, as `bpf_get_netns_cookie()` sees it.
pub(crate) fn netns_cookie() -> io::Result<u64> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a live u64 and `len` its size; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// `BPF_MAP_LOOKUP_BATCH` from `linux/bpf.h` (Linux 5.6; per-CPU arrays since 5.13).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries read per system call by [`array_lookup_batch`].
const BATCH: usize = 1024;

/// Entries `0..n` of the array map `fd`, each `value_size` bytes as the kernel copies them out
/// (for a per-CPU map, `round_up(size, 8)` times the possible CPUs), handed to `each` with
/// their index, in index order: one system call per [`BATCH`] entries instead of one per
/// entry, through one buffer of [`BATCH`] values. Stops early where the map ends.
pub(crate) fn array_lookup_batch(
    fd: BorrowedFd<'_>,
    n: usize,
    value_size: usize,
    mut each: impl FnMut(usize, &[u8]),
) -> io::Result<()> {
    let mut values = vec![0u8; n.min(BATCH) * value_size];
    let mut keys = vec![0u32; BATCH];
    let (mut read, mut last) = (0usize, None::<u32>);
    while read < n {
        let want = (n - read).min(BATCH);
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: last.as_ref().map_or(0, |k| std::ptr::from_ref(k) as u64),
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: want as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `keys` holds BATCH >= count u32 keys (the map's key size), `values`
        // count * value_size bytes, `next` one key; the kernel writes at most that much
        // into each and reads `last`, a live u32, or nothing when it is 0.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (rc != 0).then(io::Error::last_os_error);
        let end = err
            .as_ref()
            .is_some_and(|e| e.raw_os_error() == Some(libc::ENOENT));
        if let Some(e) = err.filter(|_| !end) {
            return Err(e);
        }
        let got = (attr.count as usize).min(want);
        for (i, (k, v)) in keys[..got]
            .iter()
            .zip(values.chunks(value_size))
            .enumerate()
        {
            if *k as usize != read + i {
                return Err(io::Error::other("batch lookup out of index order"));
            }
            each(read + i, v);
        }
        read += got;
        if end || got == 0 {
            break;
        }
        last = Some(next);
    }
    Ok(())
}

/// Whether `path` is a mounted BPF filesystem.
pub(crate) fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::FsType(BPF_FS_MAGIC as _))
}

/// Mount a BPF filesystem at `path` (created if missing).
pub(crate) fn mount_bpffs(path: &Path) -> io::Result<()> {
    mount_fs("bpf", path)
}

/// Mount the cgroup2 hierarchy at `path` (created if missing).
pub(crate) fn mount_cgroup2(path: &Path) -> io::Result<()> {
    mount_fs("cgroup2", path)
}

/// Mount a file system of type `kind` (source named the same) at `path`, created if missing.
fn mount_fs(kind: &str, path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path)?;
    nix::mount::mount(
        Some(kind),
        path,
        Some(kind),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// Unmount `path` (lazily: a process still inside keeps it alive, we do not).
pub(crate) fn unmount(path: &Path) -> io::Result<()> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)
}

/// The first cgroup2 mount point in `/proc/self/mountinfo` text.
pub(crate) fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split(' ').next()?;
        let mount_point = left.split(' ').nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// Undo mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(digits) = b.get(i + 1..i + 4)
            && let Ok(digits) = std::str::from_utf8(digits)
            && let Ok(v) = u8::from_str_radix(digits, 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let cases = [
            (
                "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                 41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n",
                Some("/sys/fs/cgroup/unified"),
            ),
            (
                "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n",
                Some("/sys/fs/cgroup"),
            ),
            (
                "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n",
                None,
            ),
            (
                "77 1 0:50 / /run/my\\040cg rw - cgroup2 none rw\n",
                Some("/run/my cg"),
            ),
            ("garbage\n\n", None),
        ];
        for (text, want) in cases {
            assert_eq!(find_cgroup2(text), want.map(PathBuf::from), "{text}");
        }
    }

    #[test]
    fn reads_a_netns_cookie() {
        let a = netns_cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(netns_cookie().unwrap(), a, "same namespace, same cookie");
    }
}
