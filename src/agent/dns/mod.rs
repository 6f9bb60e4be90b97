//! dns (placeholder until its work lands).
