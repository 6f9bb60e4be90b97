//! The data plane on every host: VIP addresses on the local interface (`netif`), the TCP/UDP
//! forwarder (`forward`) and the embedded DNS (`dns`). Consumes `model::VipTable`; never
//! imports `source`.

pub mod dns;
pub mod forward;
pub mod netif;
