//! The operational HTTP routes every process serves: `/healthz` (alive), `/readyz` (dependencies
//! reachable) and `/metrics` (Prometheus text format).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

/// A readiness probe: `Ok` when the process can serve (saying what is degraded, if anything),
/// or which dependency failed.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Ready, NotReady>> + Send>> + Send + Sync>;

/// A process that can serve, fully or with part of a dependency down: `/readyz` answers 200
/// with `ready`, or `ready, degraded: <what>` (a gateway with a shard down stays in rotation and
/// says which).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// What does not answer, when the process serves without it.
    pub degraded: Option<String>,
}

impl Ready {
    /// Ready without `what`.
    pub fn degraded(what: impl std::fmt::Display) -> Self {
        Self {
            degraded: Some(what.to_string()),
        }
    }
}

impl std::fmt::Display for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.degraded {
            None => f.write_str("ready"),
            Some(what) => write!(f, "ready, degraded: {what}"),
        }
    }
}

/// Why a process is not ready: the dependency whose check failed, and what the check said.
/// `/readyz` answers 503 with `not ready: <dependency>: <reason>`.
#[derive(Debug, thiserror::Error)]
#[error("{dependency}: {reason}")]
pub struct NotReady {
    /// What was checked, such as `kafka` or `shards`.
    pub dependency: &'static str,
    /// The check's own error.
    pub reason: String,
}

impl NotReady {
    pub fn new(dependency: &'static str, reason: impl std::fmt::Display) -> Self {
        Self {
            dependency,
            reason: reason.to_string(),
        }
    }
}

/// `/healthz`, `/readyz` and `/metrics`.
pub fn ops_routes(
    ready: ReadyCheck,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let health = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::with_status("ok", StatusCode::OK));
    let readyz = warp::path!("readyz").and(warp::get()).then(move || {
        let ready = ready.clone();
        async move {
            match ready().await {
                Ok(ready) => warp::reply::with_status(ready.to_string(), StatusCode::OK),
                Err(reason) => warp::reply::with_status(
                    format!("not ready: {reason}"),
                    StatusCode::SERVICE_UNAVAILABLE,
                ),
            }
        }
    });
    let metrics = warp::path!("metrics").and(warp::get()).map(|| {
        warp::reply::with_header(
            crate::telemetry::metrics_handle().render(),
            "content-type",
            "text/plain; version=0.0.4",
        )
    });
    health.or(readyz).or(metrics)
}

/// Readiness of Kafka as seen by an existing producer: its brokers answer a metadata request.
pub async fn kafka_ready(producer: crate::producer::Producer) -> Result<(), NotReady> {
    tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(None, std::time::Duration::from_secs(2))
            .map(|_| ())
            .map_err(|e| NotReady::new("kafka", e))
    })
    .await
    .map_err(|e| NotReady::new("kafka", e))?
}

#[cfg(test)]
mod tests {
    use super::Ready;

    #[test]
    fn ready_says_what_is_degraded() {
        assert_eq!(Ready::default().to_string(), "ready");
        assert_eq!(
            Ready::degraded("shards down: shard 1: refused").to_string(),
            "ready, degraded: shards down: shard 1: refused"
        );
    }
}
