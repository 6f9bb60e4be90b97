//! netif (placeholder until its work lands).
