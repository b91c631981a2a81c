//! TLS on the public listener, when a certificate and key are configured (`TLS_CERT_FILE`,
//! `TLS_KEY_FILE`); without them the listener is plain, for a TLS-terminating load balancer.
//!
//! The certificate is reloaded without a restart: [`CertStore`] answers every handshake with
//! the certified key it holds, and [`watch`] reads both files every `reload_every` and swaps
//! the key in when their bytes changed and parse into a matching pair. A pair that does not
//! (a half-written renewal, a key that is not the certificate's) keeps the old one in service,
//! is logged once and counted in `gateway_tls_reloads_total{result="error"}`; the next change
//! is tried again. Open connections keep the certificate they shook hands with.
//!
//! rustls with the ring provider only, chosen explicitly so that no other provider compiled
//! into the build can change it.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::TlsFiles;

/// Why a certificate and key cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("the key in {key} does not serve the certificate in {cert}: {reason}")]
    Pair {
        cert: String,
        key: String,
        reason: String,
    },
    #[error("TLS settings: {0}")]
    Settings(rustls::Error),
}

/// The crypto provider of every TLS connection the gateway serves.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The bytes of both files, as last read.
#[derive(PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl TlsFiles {
    fn read(&self) -> Result<Contents, TlsError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        Ok(Contents {
            cert: read(&self.cert)?,
            key: read(&self.key)?,
        })
    }

    /// The certified key `contents` make, checked: the key must be the certificate's.
    fn certified(&self, contents: &Contents) -> Result<CertifiedKey, TlsError> {
        let cert_path = self.cert.display().to_string();
        let key_path = self.key.display().to_string();
        let chain = CertificateDer::pem_slice_iter(&contents.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                path: cert_path.clone(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate { path: cert_path });
        }
        let key = PrivateKeyDer::from_pem_slice(&contents.key).map_err(|e| TlsError::Pem {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Pair {
            cert: cert_path,
            key: key_path,
            reason: e.to_string(),
        })
    }
}

/// The certified key every handshake is answered with, swapped by [`watch`].
#[derive(Debug)]
pub(crate) struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

impl CertStore {
    fn swap(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
    }
}

/// The public listener's TLS: the acceptor, and what [`watch`] needs to keep its certificate
/// current.
pub(crate) struct Tls {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    store: Arc<CertStore>,
    files: TlsFiles,
    loaded: Contents,
}

impl Tls {
    /// Loads the pair now: a gateway configured for TLS does not start without a valid one.
    pub(crate) fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let loaded = files.read()?;
        let store = Arc::new(CertStore {
            current: RwLock::new(Arc::new(files.certified(&loaded)?)),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Settings)?
            .with_no_client_auth()
            .with_cert_resolver(store.clone());
        // Websockets and REST are HTTP/1.1 (the upgrade needs it).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            store,
            files,
            loaded,
        })
    }

    /// Reads the files once: a changed pair that is valid is swapped in (true), an invalid one
    /// is an error (the old pair stays), unchanged files are nothing to do.
    fn reload(&mut self, contents: Result<Contents, TlsError>) -> Result<bool, TlsError> {
        let contents = contents?;
        if contents == self.loaded {
            return Ok(false);
        }
        // Remembered either way: a bad pair is reported once, not at every look.
        let result = self.files.certified(&contents);
        self.loaded = contents;
        self.store.swap(result?);
        Ok(true)
    }
}

/// Keeps the served certificate in step with its files until `shutdown`.
pub(crate) async fn watch(mut tls: Tls, shutdown: CancellationToken) {
    let period = tls.files.reload_every.max(Duration::from_millis(100));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The error of the last look, so an unreadable file is logged when it starts failing, not
    // at every look.
    let mut failing: Option<String> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        // Small files, but still blocking reads: off the runtime's threads.
        let files = tls.files.clone();
        let contents = match tokio::task::spawn_blocking(move || files.read()).await {
            Ok(c) => c,
            Err(_) => continue,
        };
        match tls.reload(contents) {
            Ok(false) => failing = None,
            Ok(true) => {
                failing = None;
                metrics::counter!("gateway_tls_reloads_total", "result" => "ok").increment(1);
                tracing::info!(cert = %tls.files.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                let text = e.to_string();
                if failing.as_deref() != Some(text.as_str()) {
                    metrics::counter!("gateway_tls_reloads_total", "result" => "error")
                        .increment(1);
                    tracing::error!(error = %text, "TLS certificate not reloaded; the previous one stays in service");
                    failing = Some(text);
                }
            }
        }
    }
}

/// A connection of the public listener: plain TCP, or TLS over it.
pub(crate) enum ServerStream {
    Plain(TcpStream),
    /// Boxed: rustls's connection state is large, and plain connections should not carry its size.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and a certificate it signs for localhost and 127.0.0.1: (cert PEM, key PEM).
    fn pair() -> (String, String) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).expect("ca");
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("params");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    fn files(dir: &std::path::Path) -> TlsFiles {
        TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            reload_every: crate::config::TLS_RELOAD_EVERY,
        }
    }

    fn served(tls: &Tls) -> Vec<u8> {
        let key = tls.store.current.read().expect("lock").clone();
        key.cert[0].to_vec()
    }

    fn temp_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("gw-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn a_changed_pair_is_swapped_in_and_a_bad_one_keeps_the_old() {
        let dir = temp_dir();
        let f = files(&dir);
        let (cert1, key1) = pair();
        std::fs::write(&f.cert, &cert1).expect("write");
        std::fs::write(&f.key, &key1).expect("write");
        let mut tls = Tls::load(f.clone()).expect("loads");
        let first = served(&tls);
        assert!(!tls.reload(f.read()).expect("unchanged"), "nothing changed");

        // A new certificate with the old key: refused, the first stays.
        let (cert2, key2) = pair();
        std::fs::write(&f.cert, &cert2).expect("write");
        let e = tls.reload(f.read()).expect_err("mismatched pair");
        assert!(matches!(e, TlsError::Pair { .. }), "{e}");
        assert_eq!(served(&tls), first);
        // The same bad pair is not reported again.
        assert!(!tls.reload(f.read()).expect("seen"));

        std::fs::write(&f.key, &key2).expect("write");
        assert!(tls.reload(f.read()).expect("a valid pair"));
        assert_ne!(served(&tls), first);

        std::fs::write(&f.cert, "not a certificate").expect("write");
        assert!(matches!(
            tls.reload(f.read()),
            Err(TlsError::NoCertificate { .. })
        ));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn a_missing_or_bad_file_refuses_to_start_naming_it() {
        let dir = temp_dir();
        let f = files(&dir);
        let Err(e) = Tls::load(f.clone()) else {
            panic!("loaded without files")
        };
        assert!(e.to_string().contains("cert.pem"), "{e}");
        let (cert, _) = pair();
        std::fs::write(&f.cert, &cert).expect("write");
        std::fs::write(&f.key, "garbage").expect("write");
        let Err(e) = Tls::load(f) else {
            panic!("loaded without a key")
        };
        assert!(e.to_string().contains("key.pem"), "{e}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
