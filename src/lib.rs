//! l4lb: a Layer-4 virtual-IP load balancer for Marathon clusters.
pub mod agent;
pub mod model;
