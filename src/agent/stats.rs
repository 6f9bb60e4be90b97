//! The agent's side of [`LiveStats`]: the forwarder's counters, and the kernel path's when it
//! runs, as the API shows them. Depends on `model` (the view) and the agent's own parts.

use std::net::SocketAddr;

use crate::model::VipKey;
use crate::model::status::{BackendCounters, LiveStats, Plane, VipCounters};

use super::bpf::KernelStats;
use super::forward::ForwardStats;

/// What the agent's API reads: the proxy's counters always, the kernel path's when it runs.
#[derive(Debug, Clone)]
pub struct AgentStats {
    forward: ForwardStats,
    kernel: KernelStats,
}

impl AgentStats {
    /// `kernel`: the kernel path's counters and which plane serves each VIP (every VIP is
    /// the proxy's, with the reason, where it does not run).
    pub fn new(forward: ForwardStats, kernel: KernelStats) -> Self {
        AgentStats { forward, kernel }
    }
}

impl LiveStats for AgentStats {
    fn backend(&self, vip: &VipKey, addr: SocketAddr) -> Option<BackendCounters> {
        let mut c = self
            .forward
            .backend(vip, addr)
            .map(|s| BackendCounters {
                connections: s.active_connections,
                bytes: s.bytes,
                ejected: s.ejected,
                kernel_connections: None,
                connects: s.connects,
                connect_failures: s.connect_failures,
                connect_p50: s.connect_p50,
                connect_p99: s.connect_p99,
            })
            .unwrap_or_default();
        let k = &self.kernel;
        c.kernel_connections = k
            .runs()
            .then(|| k.backend(vip, addr).map_or(0, |k| k.connections));
        Some(c)
    }

    fn vip(&self, vip: &VipKey) -> Option<VipCounters> {
        self.forward.vip(vip).map(|s| VipCounters {
            ok: s.ok,
            failed: s.failed,
        })
    }

    fn data_plane(&self, vip: &VipKey) -> Option<(Plane, Option<String>)> {
        let p = self.kernel.plane(vip);
        Some((p.plane(), p.reason().map(str::to_string)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    #[test]
    fn the_plane_and_kernel_counts_follow_whether_the_kernel_path_runs() {
        let key = VipKey {
            ip: "198.18.128.9".parse().expect("ip"),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let addr: SocketAddr = "198.18.0.2:31000".parse().expect("addr");
        // Without the kernel path: every VIP is the proxy's, with the reason, and no kernel
        // counts are shown.
        let mut reg = prometheus_client::registry::Registry::default();
        let (_tx, rx) = tokio::sync::watch::channel(std::sync::Arc::default());
        let off = KernelStats::new(&mut reg, Some("--data-plane proxy".into()), rx);
        let proxy_only = AgentStats::new(ForwardStats::default(), off);
        let (plane, why) = proxy_only.data_plane(&key).expect("said");
        assert_eq!(plane, Plane::Proxy);
        assert!(why.is_some_and(|w| w.contains("--data-plane proxy")));
        assert_eq!(
            proxy_only.backend(&key, addr),
            Some(BackendCounters::default())
        );
        // With the kernel path, a VIP it does not translate is the proxy's, and a backend
        // it never counted shows 0 kernel connections (not "unknown").
        let both = AgentStats::new(ForwardStats::default(), KernelStats::default());
        assert_eq!(both.data_plane(&key).map(|p| p.0), Some(Plane::Proxy));
        assert_eq!(
            both.backend(&key, addr).and_then(|c| c.kernel_connections),
            Some(0)
        );
    }
}
