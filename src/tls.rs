//! TLS for outgoing HTTPS (Marathon, the Mesos master, the ACS login, controllers): rustls
//! with the ring provider, installed once per process before any HTTP client is built, and
//! the extra roots of `--ca-file` ([`CaBundle`]: a DC/OS cluster's own CA) beside the
//! system's.

use std::path::Path;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

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

/// A `reqwest` client builder with TLS ready that also trusts `ca`'s roots.
pub fn client_builder_with(ca: Option<&CaBundle>) -> reqwest::ClientBuilder {
    let b = client_builder();
    match ca {
        Some(ca) => b.tls_certs_merge(ca.certs.iter().cloned()),
        None => b,
    }
}

/// Why a CA file is refused (exit 64).
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    Empty { path: String },
    #[error("{path}: certificate {index} is not valid PEM/DER")]
    Bad { path: String, index: usize },
}

/// The certificates of a PEM bundle, trusted as roots beside the system's.
#[derive(Clone)]
pub struct CaBundle {
    certs: Vec<reqwest::Certificate>,
    path: String,
}

impl std::fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaBundle")
            .field("path", &self.path)
            .field("certs", &self.certs.len())
            .finish()
    }
}

impl CaBundle {
    /// Every `CERTIFICATE` block of the PEM file at `path` (other blocks are skipped); at
    /// least one.
    pub fn read(path: &Path) -> Result<Self, CaError> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| CaError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut certs = Vec::new();
        for (index, der) in CertificateDer::pem_slice_iter(&pem).enumerate() {
            let bad = || CaError::Bad {
                path: shown.clone(),
                index,
            };
            let der = der.map_err(|_| bad())?;
            certs.push(reqwest::Certificate::from_der(&der).map_err(|_| bad())?);
        }
        if certs.is_empty() {
            return Err(CaError::Empty { path: shown });
        }
        Ok(CaBundle { certs, path: shown })
    }

    /// Certificates in the bundle.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }
}
