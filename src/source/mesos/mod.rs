//! Following a Mesos master through the operator API v1: the RecordIO framing, the payload
//! types, the cluster state kept current event by event (pure), and the sync loop that
//! subscribes (falling back to `GET_STATE`) and feeds the shared table builder. Uses the
//! sources' neutral core (`http`, `entries`), never `marathon`.

pub mod client;
pub mod cluster;
pub mod recordio;
pub mod sync;
pub mod types;
