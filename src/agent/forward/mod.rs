//! forward (placeholder until its work lands).
