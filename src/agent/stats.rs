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
    kernel: Option<KernelStats>,
}

impl AgentStats {
    /// `kernel`: the kernel path's counters, where it runs (else every VIP is the proxy's).
    pub fn new(forward: ForwardStats, kernel: Option<KernelStats>) -> Self {
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
        c.kernel_connections = self
            .kernel
            .as_ref()
            .map(|k| k.backend(vip, addr).map_or(0, |k| k.connections));
        Some(c)
    }

    fn vip(&self, vip: &VipKey) -> Option<VipCounters> {
        self.forward.vip(vip).map(|s| VipCounters {
            ok: s.ok,
            failed: s.failed,
        })
    }

    fn data_plane(&self, vip: &VipKey) -> Option<Plane> {
        let k = self.kernel.as_ref()?;
        Some(if k.translates(vip) {
            Plane::Kernel
        } else {
            Plane::Proxy
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    #[test]
    fn without_the_kernel_path_nothing_is_said_of_planes_or_kernel_counts() {
        let key = VipKey {
            ip: "198.18.128.9".parse().expect("ip"),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let addr: SocketAddr = "198.18.0.2:31000".parse().expect("addr");
        let proxy_only = AgentStats::new(ForwardStats::default(), None);
        assert_eq!(proxy_only.data_plane(&key), None);
        assert_eq!(
            proxy_only.backend(&key, addr),
            Some(BackendCounters::default())
        );
        // With the kernel path, a VIP it does not translate is the proxy's, and a backend
        // it never counted shows 0 kernel connections (not "unknown").
        let both = AgentStats::new(ForwardStats::default(), Some(KernelStats::default()));
        assert_eq!(both.data_plane(&key), Some(Plane::Proxy));
        assert_eq!(
            both.backend(&key, addr).and_then(|c| c.kernel_connections),
            Some(0)
        );
    }
}
