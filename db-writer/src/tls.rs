//! TLS to the shards, said in the DSN the way libpq says it.
//!
//! `sslmode` takes libpq's values: `disable`, `prefer` (the default: TLS when the server offers
//! it, unverified), `require` (TLS, unverified), `verify-ca` (TLS, the server's certificate
//! chain checked against `sslrootcert`) and `verify-full` (`verify-ca`, and the host name
//! checked against the certificate). `sslrootcert` names the PEM file of the CA; without it,
//! the system's roots. tokio-postgres knows only the first three modes and no `sslrootcert`,
//! so [`parse`] takes both out of the DSN, hands it `require` for the verifying modes, and
//! builds the connector that does the checking (OpenSSL, which the Kafka clients link anyway).

use std::path::PathBuf;
use std::str::FromStr;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::config::SslMode;

/// What the DSN asks of the connection's TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verify {
    /// disable, prefer or require: no certificate check (libpq's meaning).
    None,
    /// verify-ca: the chain, against `root` (or the system's roots).
    Ca { root: Option<PathBuf> },
    /// verify-full: the chain and the host name.
    Full { root: Option<PathBuf> },
}

/// A shard DSN taken apart: what tokio-postgres parses, and the check its TLS must make.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) verify: Verify,
}

/// `dsn` fit to print: its password (URL or `key=value` form) replaced by `***`.
pub fn redacted(dsn: &str) -> String {
    if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        return match url::Url::parse(dsn) {
            Ok(mut url) if url.password().is_some() => {
                let _ = url.set_password(Some("***"));
                url.to_string()
            }
            Ok(url) => url.to_string(),
            Err(_) => "(an invalid DSN)".to_owned(),
        };
    }
    dsn.split_whitespace()
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses a DSN (URL or `key=value` form) with libpq's `sslmode` and `sslrootcert`.
pub(crate) fn parse(dsn: &str) -> Result<Target, String> {
    let mut mode: Option<String> = None;
    let mut root: Option<PathBuf> = None;
    let rest = if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        let mut url = url::Url::parse(dsn).map_err(|e| format!("invalid DSN: {e}"))?;
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter_map(|(k, v)| match k.as_ref() {
                "sslmode" => {
                    mode = Some(v.into_owned());
                    None
                }
                "sslrootcert" => {
                    root = Some(PathBuf::from(v.as_ref()));
                    None
                }
                _ => Some((k.into_owned(), v.into_owned())),
            })
            .collect();
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        url.to_string()
    } else {
        let mut kept = Vec::new();
        for item in dsn.split_whitespace() {
            match item.split_once('=') {
                Some(("sslmode", v)) => mode = Some(v.to_owned()),
                Some(("sslrootcert", v)) => root = Some(PathBuf::from(v)),
                _ => kept.push(item),
            }
        }
        kept.join(" ")
    };
    let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| e.to_string())?;
    let verify = match mode.as_deref().unwrap_or("prefer") {
        "disable" => {
            config.ssl_mode(SslMode::Disable);
            Verify::None
        }
        "prefer" => {
            config.ssl_mode(SslMode::Prefer);
            Verify::None
        }
        "require" => {
            config.ssl_mode(SslMode::Require);
            Verify::None
        }
        "verify-ca" => {
            config.ssl_mode(SslMode::Require);
            Verify::Ca { root }
        }
        "verify-full" => {
            config.ssl_mode(SslMode::Require);
            Verify::Full { root }
        }
        other => {
            return Err(format!(
                "sslmode={other}: expected disable, prefer, require, verify-ca or verify-full"
            ))
        }
    };
    Ok(Target { config, verify })
}

/// One connection to `dsn`, with libpq's TLS settings honoured as the shard pools honour them,
/// its connection task spawned: for tools and tests that want a client of their own.
pub async fn connect(dsn: &str) -> Result<tokio_postgres::Client, String> {
    let Target { config, verify } = parse(dsn)?;
    let tls = connector(&verify)?;
    let (client, connection) = config.connect(tls).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection ended");
        }
    });
    Ok(client)
}

/// The TLS connector for `verify`.
pub(crate) fn connector(verify: &Verify) -> Result<MakeTlsConnector, String> {
    let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(|e| e.to_string())?;
    let (root, check_host) = match verify {
        Verify::None => {
            builder.set_verify(SslVerifyMode::NONE);
            (None, false)
        }
        Verify::Ca { root } => (root.as_ref(), false),
        Verify::Full { root } => (root.as_ref(), true),
    };
    if let Some(root) = root {
        builder
            .set_ca_file(root)
            .map_err(|e| format!("sslrootcert={}: {e}", root.display()))?;
    }
    let mut connector = MakeTlsConnector::new(builder.build());
    if !check_host {
        connector.set_callback(|config, _host| {
            config.set_verify_hostname(false);
            Ok(())
        });
    }
    Ok(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_printed_dsn_shows_no_password() {
        let url = "postgres://chat_writer:s3cret@db:5432/chat_shard_0?sslmode=verify-full";
        let shown = redacted(url);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(
            shown,
            "postgres://chat_writer:***@db:5432/chat_shard_0?sslmode=verify-full"
        );
        let kv = "host=db user=chat_writer password=s3cret dbname=chat_shard_0";
        assert_eq!(
            redacted(kv),
            "host=db user=chat_writer password=*** dbname=chat_shard_0"
        );
        assert_eq!(redacted("postgres://chat@db/x"), "postgres://chat@db/x");
    }

    #[test]
    fn libpq_modes_and_root_certificates_are_taken_out_of_the_dsn() {
        let t = parse(
            "postgres://w:pw@127.0.0.1:54321/chat_shard_0?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
        )
        .expect("parses");
        assert_eq!(
            t.verify,
            Verify::Full {
                root: Some("/ca.pem".into())
            }
        );
        assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(t.config.get_application_name(), Some("x"));
        assert_eq!(t.config.get_dbname(), Some("chat_shard_0"));

        let t = parse("host=127.0.0.1 port=54321 user=r sslmode=verify-ca dbname=d").expect("kv");
        assert_eq!(t.verify, Verify::Ca { root: None });
        assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(t.config.get_dbname(), Some("d"));

        let t = parse("postgres://chat@127.0.0.1:54320/chat_shard_0").expect("plain");
        assert_eq!(t.verify, Verify::None);
        assert_eq!(t.config.get_ssl_mode(), SslMode::Prefer);
        let t = parse("postgres://chat@127.0.0.1/x?sslmode=disable").expect("disable");
        assert_eq!(t.config.get_ssl_mode(), SslMode::Disable);

        let err = parse("postgres://chat@127.0.0.1/x?sslmode=allow").expect_err("allow");
        assert!(err.contains("sslmode=allow"), "{err}");
        assert!(connector(&Verify::Full {
            root: Some("/no/such/ca.pem".into())
        })
        .is_err());
    }
}
