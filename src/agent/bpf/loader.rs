//! Loading, attaching, pinning and detaching the programs, and applying planned operations to
//! their maps: the I/O shell around [`plan`](super::plan).
//!
//! Everything lives under `<bpffs>/l4lb/<instance>/` (`prog_*`, `link_*`, `map_*`), so two
//! agents on one kernel never clash. A killed agent's pinned links keep its programs attached
//! and translating with its last maps. A restarted agent takes over without a gap: it loads
//! and pins its own programs aside (`<instance>+<pid>-<n>/`), fills their maps from its first table,
//! attaches them beside the old ones (a connection translated by one is a backend address to
//! the other, so nothing is translated twice), then unpins the old links (they detach),
//! carries the old reverse-translation entries over and renames its directory into place.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHash, IterableMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, Iter};
use aya::{Ebpf, EbpfLoader};

use super::layout::{self, BeKey, BeVal, Counters, DestroyKey, NatKey, NatVal, SvcKey, SvcVal};
use super::object;
use super::plan::{Ejected, Op, Planner};
use super::sys;
use super::{BpfConfig, BpfError, Counts, KernelCounters};
use crate::model::{VipKey, VipTable};

/// The compiled programs (`progs/l4lb.bpf.c`, built by `scripts/build-bpf.sh`).
static OBJECT: &[u8] = aya::include_bytes_aligned!("progs/l4lb.bpf.o");
/// The socket iterators (`progs/sockets.bpf.c`), loaded beside them where the kernel can.
static SOCKETS: &[u8] = aya::include_bytes_aligned!("progs/sockets.bpf.o");

/// The programs, by function name in the object.
pub(crate) const PROGRAMS: [&str; 8] = [
    "l4lb_connect4",
    "l4lb_connect6",
    "l4lb_sendmsg4",
    "l4lb_sendmsg6",
    "l4lb_recvmsg4",
    "l4lb_recvmsg6",
    "l4lb_getpeername4",
    "l4lb_getpeername6",
];
const MAPS: [&str; 4] = ["services", "backends", "revnat", "counters"];
/// The socket iterators, by function name, with the kernel's iterator they walk.
const ITERATORS: [(&str, &str); 2] = [("l4lb_iter_udp", "udp"), ("l4lb_iter_tcp", "tcp")];

/// The objects as committed: the programs, and the socket iterators (the kfunc placeholder
/// not yet patched).
#[cfg(test)]
pub(crate) fn objects() -> [&'static [u8]; 2] {
    [OBJECT, SOCKETS]
}

/// How long a restarted agent waits for a killed one's links to go.
const REPLACE_WAIT: Duration = Duration::from_secs(2);

/// The programs attached to a cgroup, their pins and their maps.
pub struct KernelPath {
    /// Holds the loaded programs (also pinned).
    ebpf: Ebpf,
    /// Empty while a predecessor's programs still serve.
    links: Vec<PinnedLink>,
    /// Pin directories an earlier agent of this instance left, attached and serving until
    /// this agent's first table is in its own maps.
    predecessors: Vec<PathBuf>,
    services: BpfHash<MapData, SvcKey, SvcVal>,
    backends: BpfHash<MapData, BeKey, BeVal>,
    counters: PerCpuArray<MapData, Counters>,
    /// The socket iterators and the (VIP, backend) pairs they close sockets of, or why the
    /// kernel cannot run them (logged once at load).
    sockets: Result<Sockets, String>,
    planner: Planner,
    pin_dir: PathBuf,
    /// Where the pins go once this agent serves (`pin_dir` until then, during a takeover).
    home: PathBuf,
    cgroup: PathBuf,
    netns_cookie: u64,
    /// File systems this agent mounted (unmounted at close).
    mounted: Vec<PathBuf>,
    nr_cpus: usize,
}

impl std::fmt::Debug for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelPath")
            .field("pin_dir", &self.pin_dir)
            .field("cgroup", &self.cgroup)
            .field("netns_cookie", &self.netns_cookie)
            .finish_non_exhaustive()
    }
}

impl KernelPath {
    /// Load the programs, replace whatever an earlier agent of this instance left, attach to
    /// the cgroup and pin everything. Fails (leaving nothing behind) where the kernel cannot.
    pub fn load(cfg: &BpfConfig) -> Result<KernelPath, BpfError> {
        let mut mounted = Vec::new();
        let res = Self::load_inner(cfg, &mut mounted);
        if res.is_err() {
            for m in mounted.iter().rev() {
                let _ = sys::unmount(m);
            }
        }
        res
    }

    fn load_inner(cfg: &BpfConfig, mounted: &mut Vec<PathBuf>) -> Result<KernelPath, BpfError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BpfError::Io { path, source }
        };
        if !sys::is_bpffs(&cfg.bpffs) {
            sys::mount_bpffs(&cfg.bpffs).map_err(io(&cfg.bpffs))?;
            mounted.push(cfg.bpffs.clone());
        }
        let cgroup = match &cfg.cgroup {
            Some(p) => p.clone(),
            None => {
                let info = std::fs::read_to_string("/proc/self/mountinfo")
                    .map_err(io(Path::new("/proc/self/mountinfo")))?;
                match sys::find_cgroup2(&info) {
                    Some(p) => p,
                    None => {
                        let p = cfg.cgroup_mount.clone();
                        sys::mount_cgroup2(&p).map_err(io(&p))?;
                        mounted.push(p.clone());
                        p
                    }
                }
            }
        };
        let netns_cookie = if cfg.netns_only {
            sys::netns_cookie().map_err(BpfError::NetnsCookie)?
        } else {
            0
        };
        let home = cfg.bpffs.join("l4lb").join(&cfg.instance);
        let predecessors = leftovers(&home);
        // With no predecessor serving, attach at once; else pin aside and take over later.
        let pin_dir = match predecessors.is_empty() {
            true => home.clone(),
            false => staging(&home),
        };
        std::fs::create_dir_all(&pin_dir).map_err(io(&pin_dir))?;
        let loaded = load_and_pin(&pin_dir, netns_cookie).and_then(|l| {
            let nr_cpus = aya::util::nr_cpus().map_err(|(_, e)| BpfError::Io {
                path: PathBuf::from("/sys/devices/system/cpu/possible"),
                source: e,
            })?;
            let mut kp = KernelPath {
                ebpf: l.ebpf,
                links: Vec::new(),
                predecessors,
                services: l.services,
                backends: l.backends,
                counters: l.counters,
                sockets: l.sockets,
                planner: Planner::default(),
                pin_dir: pin_dir.clone(),
                home,
                cgroup: cgroup.clone(),
                netns_cookie,
                mounted: std::mem::take(mounted),
                nr_cpus,
            };
            if kp.predecessors.is_empty() {
                kp.links = attach(&mut kp.ebpf, &kp.pin_dir, &kp.cgroup)?;
            } else {
                tracing::info!(
                    pins = %kp.pin_dir.display(),
                    predecessors = ?kp.predecessors,
                    "an earlier agent's kernel data path serves until this one has a table"
                );
            }
            Ok(kp)
        });
        match loaded {
            Ok(kp) => {
                tracing::info!(
                    cgroup = %cgroup.display(),
                    pins = %pin_dir.display(),
                    netns_cookie,
                    "kernel data path loaded"
                );
                Ok(kp)
            }
            Err(e) => {
                let _ = unpin_all(&pin_dir);
                Err(e)
            }
        }
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Where the programs, links and maps are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Make the maps follow `table`, leaving `ejected` backends out. On a failed map write the
    /// maps are cleared (every VIP goes to the proxy) and the next apply rewrites them whole.
    pub fn apply(&mut self, table: &Arc<VipTable>, ejected: &Ejected) -> Result<usize, BpfError> {
        let ops = self.planner.plan(table, ejected);
        let n = ops.len();
        for op in &ops {
            if let Err(e) = self.execute(op) {
                self.clear();
                return Err(e);
            }
        }
        // Version 0 is the empty table before the first from the controller: the
        // predecessor's maps are better than none until then.
        if !self.predecessors.is_empty() && table.version != 0 {
            self.take_over()?;
        }
        Ok(n)
    }

    /// Whether an earlier agent's programs still serve (this one's are loaded, not attached).
    pub fn taking_over(&self) -> bool {
        !self.predecessors.is_empty()
    }

    /// Attach beside the predecessor's programs, detach theirs, keep their reverse entries
    /// and move this agent's pins into place.
    fn take_over(&mut self) -> Result<(), BpfError> {
        self.links = attach(&mut self.ebpf, &self.pin_dir, &self.cgroup)?;
        let started = Instant::now();
        let mut carried = 0;
        for dir in std::mem::take(&mut self.predecessors) {
            // Opened before the unpin: the entries of connections made until the detach.
            let old_revnat = MapData::from_pin(dir.join("map_revnat")).ok();
            if let Err(e) = replace(&dir) {
                tracing::warn!(error = %e, "an earlier agent's kernel data path lingers");
            }
            if let Some(old) = old_revnat {
                carried += self.carry_revnat(old);
            }
        }
        if self.pin_dir != self.home {
            match std::fs::rename(&self.pin_dir, &self.home) {
                Ok(()) => self.pin_dir = self.home.clone(),
                Err(e) => tracing::warn!(
                    error = %e,
                    pins = %self.pin_dir.display(),
                    "cannot move the pins into place; they stay where they are"
                ),
            }
        }
        tracing::info!(
            carried,
            takeover_us = started.elapsed().as_micros() as u64,
            pins = %self.pin_dir.display(),
            "kernel data path taken over from the earlier agent"
        );
        Ok(())
    }

    /// Copy a predecessor's reverse translations, so `getpeername()`/`recvmsg()` on sockets
    /// it translated still show the VIP. Returns how many.
    fn carry_revnat(&mut self, old: MapData) -> usize {
        let Ok(old) = aya::maps::Map::from_map_data(old)
            .and_then(BpfHash::<MapData, NatKey, NatVal>::try_from)
        else {
            return 0;
        };
        let Some(new) = self.ebpf.map_mut("revnat") else {
            return 0;
        };
        let Ok(mut new) = BpfHash::<&mut MapData, NatKey, NatVal>::try_from(new) else {
            return 0;
        };
        old.iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| new.insert(k, v, 0).is_ok())
            .count()
    }

    fn execute(&mut self, op: &Op) -> Result<(), BpfError> {
        let map = |name: &'static str| move |source| BpfError::Map { name, source };
        match op {
            Op::ResetCounter { counter } => {
                let zeros = PerCpuValues::try_from(vec![[0u8; 16]; self.nr_cpus]).map_err(|e| {
                    BpfError::Io {
                        path: self.pin_dir.join("map_counters"),
                        source: e,
                    }
                })?;
                self.counters
                    .set(*counter, zeros, 0)
                    .map_err(map("counters"))
            }
            Op::PutBackend {
                set,
                slot,
                addr,
                counter,
            } => self
                .backends
                .insert(
                    layout::be_key(*set, *slot),
                    layout::be_val(*addr, *counter),
                    0,
                )
                .map_err(map("backends")),
            Op::PutService { vip, set, count } => self
                .services
                .insert(layout::svc_key(vip), layout::svc_val(*count, *set), 0)
                .map_err(map("services")),
            Op::DelService { vip } => {
                remove(&mut self.services, &layout::svc_key(vip)).map_err(map("services"))
            }
            Op::DelBackend { set, slot } => {
                remove(&mut self.backends, &layout::be_key(*set, *slot)).map_err(map("backends"))
            }
        }
    }

    /// Whether this kernel runs the socket iterators, or why not (then
    /// [`Self::destroy_sockets`] does nothing).
    pub fn closes_sockets(&self) -> Result<(), &str> {
        self.sockets.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// Destroy (`ECONNABORTED`) the connected sockets of this network namespace that the
    /// programs translated from one of `pairs`' VIPs to its backend; sockets connected to the
    /// backend directly are not touched. Returns how many were destroyed.
    pub fn destroy_sockets(&mut self, pairs: &[(VipKey, SocketAddr)]) -> Result<usize, BpfError> {
        let Ok(Sockets { ebpf, destroy }) = self.sockets.as_mut() else {
            return Ok(0);
        };
        if pairs.is_empty() {
            return Ok(0);
        }
        let map = |source| BpfError::Map {
            name: "destroy",
            source,
        };
        let keys: Vec<DestroyKey> = pairs
            .iter()
            .map(|(vip, b)| layout::destroy_key(vip, *b))
            .collect();
        let mut res = Ok(0);
        for k in &keys {
            if let Err(e) = destroy.insert(k, 1, 0) {
                res = Err(map(e));
                break;
            }
        }
        if res.is_ok() {
            res = ITERATORS
                .iter()
                .try_fold(0, |n, (name, _)| Ok(n + run_iterator(ebpf, name)?));
        }
        for k in &keys {
            let _ = remove(destroy, k);
        }
        res
    }

    /// Empty the service and backend maps and forget what was planned.
    fn clear(&mut self) {
        let keys: Vec<SvcKey> = self.services.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.services.remove(&k);
        }
        let keys: Vec<BeKey> = self.backends.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.backends.remove(&k);
        }
        self.planner = Planner::default();
    }

    /// The backends `vip` is translated to now (empty: served by the proxy).
    pub fn installed(&self, vip: &VipKey) -> Vec<SocketAddr> {
        self.planner.installed(vip)
    }

    /// VIPs with active backends left to the proxy because the maps are full.
    pub fn over_capacity(&self) -> usize {
        self.planner.over_capacity()
    }

    /// The VIPs the kernel translates.
    pub fn translated(&self) -> impl Iterator<Item = &VipKey> {
        self.planner.translated()
    }

    /// Number of VIPs the kernel translates.
    pub fn installed_count(&self) -> usize {
        self.planner.installed_count()
    }

    /// The (VIP, backend) pairs the applies since the last call moved.
    pub(crate) fn take_moves(&mut self) -> super::plan::Moves {
        self.planner.take_moves()
    }

    /// Why each VIP of the last applied table that the kernel does not translate is not.
    pub(crate) fn not_translated(&self) -> BTreeMap<VipKey, super::plan::NotTranslated> {
        self.planner.not_translated_all()
    }

    /// Distinct backend addresses of the TCP VIPs applied last (what health probes).
    pub fn tcp_backends(&self) -> Vec<SocketAddr> {
        self.planner.tcp_backends()
    }

    /// The kernel's per-backend counters, summed over CPUs, with the table and counter ids
    /// that name them.
    pub fn counters(&self) -> Counts {
        let (table, ids) = self.planner.counter_ids();
        let n = self.planner.counter_ids_issued();
        // A kernel without batched per-CPU array reads (before 5.13): one at a time.
        let values = self
            .counters_batched(n)
            .unwrap_or_else(|_| self.counters_each(n));
        Counts {
            table,
            ids,
            values: Arc::new(values),
        }
    }

    /// Counters `0..n` (those freed too, named by no backend) in a few system calls: one a
    /// counter took ~10% of a core on an agent with 65,536 of them.
    pub(crate) fn counters_batched(&self, n: usize) -> std::io::Result<Vec<KernelCounters>> {
        let mut values = vec![KernelCounters::default(); n];
        let per_cpu = std::mem::size_of::<Counters>();
        let fd = self.counters.map().fd().as_fd();
        sys::array_lookup_batch(fd, n, per_cpu * self.nr_cpus, |i, bytes| {
            if let Some(v) = values.get_mut(i) {
                for c in bytes.chunks_exact(per_cpu) {
                    if let Ok(c) = Counters::try_from(c) {
                        add_counters(v, &c);
                    }
                }
            }
        })?;
        Ok(values)
    }

    /// Counter ids handed out so far.
    #[cfg(test)]
    pub(crate) fn planner_counter_ids_issued(&self) -> usize {
        self.planner.counter_ids_issued()
    }

    /// The counter ids in use.
    #[cfg(test)]
    pub(crate) fn planner_counters(&self) -> Vec<(VipKey, SocketAddr, u32)> {
        self.planner
            .counters()
            .map(|(k, a, c)| (*k, a, c))
            .collect()
    }

    /// The counters in use among `0..n`, one lookup each.
    pub(crate) fn counters_each(&self, n: usize) -> Vec<KernelCounters> {
        let mut values = vec![KernelCounters::default(); n];
        for (_, _, idx) in self.planner.counters() {
            let (Ok(per_cpu), Some(v)) = (self.counters.get(&idx, 0), values.get_mut(idx as usize))
            else {
                continue;
            };
            for c in per_cpu.iter() {
                add_counters(v, c);
            }
        }
        values
    }

    /// Let go without detaching, unpinning or unmounting anything: a successor
    /// (`--take-over`) has taken the pins over. The links this agent still holds detach
    /// when it drops them, the successor's own being attached already.
    pub fn release(self) {
        tracing::info!(pins = %self.home.display(), "kernel data path left to the successor");
    }

    /// Detach the programs, unpin everything and unmount what this agent mounted.
    pub fn close(self) -> Result<(), BpfError> {
        let KernelPath {
            ebpf,
            links,
            predecessors,
            pin_dir,
            mounted,
            cgroup,
            ..
        } = self;
        let mut first_err = None;
        // Stopped before it took over: what the earlier agent left goes too.
        for dir in predecessors {
            if let Err(e) = replace(&dir) {
                tracing::warn!(error = %e, "an earlier agent's kernel data path lingers");
            }
        }
        // The pins go first, so the last reference to each link is this agent's descriptor
        // and dropping it detaches at once (a pin's release is deferred work).
        if let Err(e) = unpin_all(&pin_dir) {
            first_err.get_or_insert(e);
        }
        drop(links);
        drop(ebpf);
        for m in mounted.iter().rev() {
            // A BPF filesystem another instance still pins into stays mounted.
            if !m.join("l4lb").exists() && sys::unmount(m).is_ok() && *m != cgroup {
                // The mount point was made for it (fails harmlessly where it was not ours). The
                // cgroup2 mount point (`/run/l4lb/cgroup2`) stays: another agent, in a mount
                // namespace of its own, may be about to mount there, and removing the directory
                // would also detach its mount.
                let _ = std::fs::remove_dir(m);
            }
        }
        tracing::info!(pins = %pin_dir.display(), "kernel data path detached");
        match first_err {
            None => Ok(()),
            Some(source) => Err(BpfError::Io {
                path: pin_dir,
                source,
            }),
        }
    }

    /// Tests only: the kernel ids of the loaded programs.
    #[cfg(test)]
    pub(crate) fn prog_ids(&self) -> Vec<u32> {
        PROGRAMS
            .iter()
            .filter_map(|n| {
                let p: &CgroupSockAddr = self.ebpf.program(n)?.try_into().ok()?;
                p.info().ok().map(|i| i.id())
            })
            .collect()
    }

    /// Tests only: drop every file descriptor but leave the pins, as a SIGKILL would.
    #[cfg(test)]
    pub(crate) fn abandon(self) {
        drop(self);
    }
}

/// Run the iterator `name` once over this network namespace's sockets: the bytes it writes
/// are the sockets it destroyed.
fn run_iterator(ebpf: &mut Ebpf, name: &'static str) -> Result<usize, BpfError> {
    use std::io::Read as _;
    let prog_err = |source| BpfError::Program { name, source };
    let prog: &mut Iter = ebpf
        .program_mut(name)
        .ok_or(BpfError::Missing(name))?
        .try_into()
        .map_err(prog_err)?;
    let id = prog.attach().map_err(prog_err)?;
    let link = prog.take_link(id).map_err(prog_err)?;
    let mut file = link.into_file().map_err(|e| BpfError::Link(name, e))?;
    let mut out = Vec::new();
    file.read_to_end(&mut out).map_err(|source| BpfError::Io {
        path: PathBuf::from(format!("bpf_iter:{name}")),
        source,
    })?;
    Ok(out.len())
}

/// Remove `key`; absent is fine.
fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut BpfHash<MapData, K, V>,
    key: &K,
) -> Result<(), aya::maps::MapError> {
    match map.remove(key) {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        r => r,
    }
}

/// The loaded programs and the maps this agent writes.
struct Loaded {
    ebpf: Ebpf,
    services: BpfHash<MapData, SvcKey, SvcVal>,
    backends: BpfHash<MapData, BeKey, BeVal>,
    counters: PerCpuArray<MapData, Counters>,
    sockets: Result<Sockets, String>,
}

/// The loaded socket iterators (`progs/sockets.bpf.c`) and their `destroy` map.
struct Sockets {
    ebpf: Ebpf,
    destroy: BpfHash<MapData, DestroyKey, u8>,
}

/// Load the socket iterators, their `bpf_sock_destroy()` calls bound to this kernel's
/// function and their `revnat` the programs' own (pinned at `revnat_pin`). Not pinned
/// themselves: each run attaches them anew, and a restarted agent loads its own.
fn load_sockets(revnat_pin: &Path) -> Result<Sockets, String> {
    let vmlinux =
        std::fs::read("/sys/kernel/btf/vmlinux").map_err(|e| format!("no kernel BTF: {e}"))?;
    let id = object::func_id(&vmlinux, "bpf_sock_destroy")
        .map_err(|e| format!("cannot read the kernel BTF: {e}"))?
        .ok_or("the kernel has no bpf_sock_destroy() (Linux 6.5)")?;
    let (bytes, _) = object::patch_kfunc(SOCKETS, id).map_err(|e| e.to_string())?;
    let mut ebpf = EbpfLoader::new()
        .map_pin_path("revnat", revnat_pin)
        .load(&bytes)
        .map_err(|e| super::chain(&e))?;
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
    for (name, kind) in ITERATORS {
        let prog: &mut Iter = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("the object has no {name}"))?
            .try_into()
            .map_err(|e| format!("{name}: {}", super::chain(&e)))?;
        prog.load(kind, &btf)
            .map_err(|e| format!("{name}: {}", super::chain(&e)))?;
    }
    let destroy = ebpf
        .take_map("destroy")
        .ok_or("the object has no destroy")?;
    let destroy = BpfHash::try_from(destroy).map_err(|e| super::chain(&e))?;
    Ok(Sockets { ebpf, destroy })
}

/// Load the object, load its programs, and pin maps and programs in `pin_dir`.
fn load_and_pin(pin_dir: &Path, netns_cookie: u64) -> Result<Loaded, BpfError> {
    let mut ebpf = EbpfLoader::new()
        .override_global("netns_cookie", &netns_cookie, true)
        .load(OBJECT)
        .map_err(|e| BpfError::Load(Box::new(e)))?;
    for name in MAPS {
        let m = ebpf.map(name).ok_or(BpfError::Missing(name))?;
        m.pin(pin_dir.join(format!("map_{name}")))
            .map_err(|e| BpfError::Pin(name, e))?;
    }
    for name in PROGRAMS {
        let prog = program(&mut ebpf, name)?;
        prog.load()
            .map_err(|source| BpfError::Program { name, source })?;
        prog.pin(pin_dir.join(format!("prog_{name}")))
            .map_err(|e| BpfError::Pin(name, e))?;
    }
    let take =
        |ebpf: &mut Ebpf, name: &'static str| ebpf.take_map(name).ok_or(BpfError::Missing(name));
    let map = |name: &'static str| move |source| BpfError::Map { name, source };
    let services = BpfHash::try_from(take(&mut ebpf, "services")?).map_err(map("services"))?;
    let backends = BpfHash::try_from(take(&mut ebpf, "backends")?).map_err(map("backends"))?;
    let counters = PerCpuArray::try_from(take(&mut ebpf, "counters")?).map_err(map("counters"))?;
    let sockets = load_sockets(&pin_dir.join("map_revnat"));
    if let Err(why) = &sockets {
        tracing::warn!(
            reason = %why,
            "kernel path: sockets connected to a removed backend cannot be closed; \
             they keep sending to it until the application reconnects"
        );
    }
    Ok(Loaded {
        ebpf,
        services,
        backends,
        counters,
        sockets,
    })
}

/// The program `name` of the object.
fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSockAddr, BpfError> {
    ebpf.program_mut(name)
        .ok_or(BpfError::Missing(name))?
        .try_into()
        .map_err(|source| BpfError::Program { name, source })
}

/// Add one CPU's counters to `v`.
fn add_counters(v: &mut KernelCounters, c: &Counters) {
    let (connections, datagrams) = layout::parse_counters(c);
    v.connections += connections;
    v.datagrams += datagrams;
}

/// Attach the loaded programs to `cgroup` with links pinned in `pin_dir`.
fn attach(ebpf: &mut Ebpf, pin_dir: &Path, cgroup: &Path) -> Result<Vec<PinnedLink>, BpfError> {
    let cg = File::open(cgroup).map_err(|source| BpfError::Io {
        path: cgroup.to_path_buf(),
        source,
    })?;
    let mut links = Vec::new();
    for name in PROGRAMS {
        let prog_err = |source| BpfError::Program { name, source };
        let prog = program(ebpf, name)?;
        // A BPF link (aya uses one from Linux 5.7) is always attached as BPF_F_ALLOW_MULTI,
        // and the kernel refuses link_create with attach flags (EINVAL), hence no flag here.
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(prog_err)?;
        let link = prog.take_link(id).map_err(prog_err)?;
        let link = FdLink::try_from(link).map_err(|e| BpfError::Link(name, e))?;
        links.push(
            link.pin(pin_dir.join(format!("link_{name}")))
                .map_err(|e| BpfError::Pin(name, e))?,
        );
    }
    Ok(links)
}

/// The pin directories of earlier agents of the instance pinned at `home`: `home` itself and
/// any `<instance>+<pid>-<n>` a takeover left (`+` is not allowed in an instance name).
fn leftovers(home: &Path) -> Vec<PathBuf> {
    let (Some(parent), Some(name)) = (home.parent(), home.file_name()) else {
        return Vec::new();
    };
    let name = name.to_string_lossy();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n == name
                || n.strip_prefix(name.as_ref())
                    .is_some_and(|r| r.starts_with('+'))
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Where a taking-over agent pins its own programs until it serves.
fn staging(home: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut name = home.file_name().unwrap_or_default().to_os_string();
    name.push(format!("+{}-{nanos}", std::process::id()));
    home.with_file_name(name)
}

/// Unpin what an earlier agent of this instance left in `pin_dir`, and wait until its links
/// are gone from the kernel (their release is deferred work).
fn replace(pin_dir: &Path) -> Result<(), BpfError> {
    if !pin_dir.exists() {
        return Ok(());
    }
    let mut old_links = Vec::new();
    if let Ok(entries) = std::fs::read_dir(pin_dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("link_")
                && let Ok(l) = PinnedLink::from_pin(e.path())
                && let Ok(info) = FdLink::from(l).info()
            {
                old_links.push(info.id());
            }
        }
    }
    tracing::warn!(
        pins = %pin_dir.display(),
        links = old_links.len(),
        "replacing the kernel data path an earlier agent left"
    );
    unpin_all(pin_dir).map_err(|source| BpfError::Io {
        path: pin_dir.to_path_buf(),
        source,
    })?;
    let deadline = Instant::now() + REPLACE_WAIT;
    loop {
        let live = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .any(|l| old_links.contains(&l.id()));
        if !live {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BpfError::StillAttached(pin_dir.to_path_buf()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Remove every pin in `dir` (links first), the directory, and `l4lb/` if it is then empty.
fn unpin_all(dir: &Path) -> std::io::Result<()> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    files.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
    });
    for f in files {
        match std::fs::remove_file(&f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::remove_dir(dir)?;
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent); // fails while another instance is pinned there
    }
    Ok(())
}
