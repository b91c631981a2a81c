//! Which servers a client trusts over `wss://` and `https://`.
//!
//! By default the roots compiled in from Mozilla's list (webpki-roots), the same on every
//! machine; [`Tls::with_ca_file`] adds the CAs of a PEM file to them, for a gateway whose
//! certificate comes from a private CA (a test CA, or a company's). rustls with the ring
//! provider, chosen explicitly.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

use crate::ClientError;

/// The TLS settings of a client's connections: the CAs it trusts. Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
    /// CAs added to the default roots (for `Debug`).
    extra_cas: usize,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("extra_cas", &self.extra_cas)
            .finish()
    }
}

impl Default for Tls {
    /// Trusts the default roots only.
    fn default() -> Self {
        Self::build(Vec::new()).expect("the default roots make a valid configuration")
    }
}

impl Tls {
    /// Trusts the default roots and every certificate of the PEM file at `path`.
    pub fn with_ca_file(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let pem = std::fs::read(path).map_err(|e| ClientError::CaFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::with_ca_pem(&pem).map_err(|e| match e {
            ClientError::CaFile { reason, .. } => ClientError::CaFile {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Trusts the default roots and every certificate of `pem`.
    pub fn with_ca_pem(pem: &[u8]) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::CaFile {
            path: "(PEM)".to_owned(),
            reason,
        };
        let cas = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if cas.is_empty() {
            return Err(bad("no PEM certificate in it".to_owned()));
        }
        Self::build(cas)
    }

    fn build(cas: Vec<CertificateDer<'static>>) -> Result<Self, ClientError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let extra_cas = cas.len();
        for ca in cas {
            roots.add(ca).map_err(|e| ClientError::CaFile {
                path: "(PEM)".to_owned(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::CaFile {
                path: "(PEM)".to_owned(),
                reason: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // The gateway speaks HTTP/1.1 only (the websocket upgrade needs it).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            extra_cas,
        })
    }

    /// The rustls configuration of a connection.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }
}

/// What a failed TLS handshake says, when `error` (or an error it wraps) is one: the
/// certificate problem in words a user can act on.
pub(crate) fn handshake_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(describe(tls));
        }
        // io::Error hides what it wraps from `source`.
        let wrapped = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        next = wrapped.or_else(|| e.source());
    }
    None
}

fn describe(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            "the server's certificate is not signed by a trusted CA (UnknownIssuer); pass its CA \
             with --ca-file"
                .to_owned()
        }
        rustls::Error::InvalidCertificate(why) => {
            format!("the server's certificate is not valid for it: {why}")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        assert!(matches!(
            Tls::with_ca_pem(b"nothing here"),
            Err(ClientError::CaFile { .. })
        ));
        let e = Tls::with_ca_file("/nonexistent/ca.pem").expect_err("no file");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        assert_eq!(Tls::default().extra_cas, 0);
    }
}
