//! Where VIP tables come from: Marathon (REST snapshot + SSE invalidation), a Marathon-shaped
//! apps file, or (for agents) a controller's `/v1/vips` watch. Depends on `model`, never on
//! `agent`.

pub mod build;
pub mod marathon;
