//! TLS for outgoing HTTPS (Marathon, controllers): rustls with the ring provider, installed
//! once per process before any HTTP client is built.

/// Install the process-wide rustls provider (idempotent; safe from any thread).
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A `reqwest` client builder with TLS ready.
pub fn client_builder() -> reqwest::ClientBuilder {
    init();
    reqwest::Client::builder()
}
