//! The routing table: which gateway holds each user's live session.
//!
//! Built by reading the compacted `presence` topic in full (every multiplexer reads every
//! partition, without a consumer group). A record replaces the route of its user only when its
//! epoch is not older, so a late "offline" from a gateway the user left cannot end the session
//! the user opened elsewhere.
//!
//! Used by the multiplexer (to route) and the gateway (to close a session the user has replaced
//! by connecting to another gateway).
//!
//! [`PresenceView::catch_up`] closes the race between a user connecting and a message being
//! routed: the gateway publishes presence (and waits for the broker's ack) *before* it runs the
//! user's sync query, and the multiplexer routes a batch once its messages are committed, with
//! the view as it stands, and once the users' index has moved catches up with the presence log
//! and routes the batch once more to the users whose route changed. So a session announced
//! before that catch-up gets the batch pushed, and one announced after it runs its sync after
//! the index moved, and finds the batch there. Nothing falls between the push and the sync
//! (docs/design.md, "Routing without a gap").

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::ids::GatewayId;
use crate::kafka::{KafkaConfig, KafkaError};
use chat_proto::v1::PresenceRecord;
use prost::Message as _;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A user's route as the presence log last said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub gateway: GatewayId,
    pub epoch: u64,
    pub online: bool,
}

/// Called with each route that replaced an older one (the gateway uses it to close sessions
/// the user has opened elsewhere since).
pub type OnRoute = Arc<dyn Fn(&str, &Route) + Send + Sync>;

/// A live, shared view of the `presence` topic.
#[derive(Clone)]
pub struct PresenceView {
    routes: Arc<RwLock<HashMap<String, Route>>>,
    /// Next offset to read, per partition (advanced as records are applied).
    positions: watch::Receiver<HashMap<i32, i64>>,
    /// A client of its own for end-offset queries: on the reader's client they would queue
    /// behind its long-poll fetches (about 10 ms each).
    offsets: Arc<crate::kafka::Reader>,
    topic: String,
    partitions: Vec<i32>,
}

impl PresenceView {
    /// Starts reading `topic` from the beginning; the returned view fills as records arrive.
    pub async fn start(
        kafka: &KafkaConfig,
        topic: &str,
        on_route: Option<OnRoute>,
        shutdown: CancellationToken,
    ) -> Result<Self, KafkaError> {
        let consumer = Arc::new(kafka.reader()?);
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let (tx, rx) = watch::channel(partitions.iter().map(|p| (*p, 0)).collect());
        let routes: Arc<RwLock<HashMap<String, Route>>> = Arc::default();
        let view = Self {
            routes: routes.clone(),
            positions: rx,
            offsets: Arc::new(kafka.reader()?),
            topic: topic.to_owned(),
            partitions,
        };
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    m = crate::kafka::read_next(&consumer) => m,
                };
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "presence read failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let changed = apply(&routes, msg.key(), msg.payload());
                if let (Some(f), Some((user, route))) = (&on_route, changed) {
                    f(&user, &route);
                }
                let (p, o) = (msg.partition(), msg.offset());
                tx.send_modify(|pos| {
                    pos.insert(p, o + 1);
                });
            }
        });
        Ok(view)
    }

    /// The gateway holding `user`'s session, if the user is online.
    pub fn route(&self, user: &str) -> Option<GatewayId> {
        self.route_of(user).map(|r| r.gateway)
    }

    /// `user`'s route, if the user is online.
    pub fn route_of(&self, user: &str) -> Option<Route> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.get(user).filter(|r| r.online).cloned()
    }

    /// The users whose session the log says is open on `gateway`, with their session epochs,
    /// sorted by user.
    pub fn online_at(&self, gateway: &GatewayId) -> Vec<(String, u64)> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let mut users: Vec<(String, u64)> = routes
            .iter()
            .filter(|(_, r)| r.online && &r.gateway == gateway)
            .map(|(u, r)| (u.clone(), r.epoch))
            .collect();
        users.sort();
        users
    }

    /// Waits until every record that was in the presence log when this was called has been
    /// applied. Returns false if that did not happen within `timeout` (the caller routes with
    /// what it has; the sync on the next connect covers anything missed).
    pub async fn catch_up(&self, timeout: Duration) -> bool {
        // Every partition's end offset, in one request (a lookup by timestamp, with the
        // timestamp "latest"), not one per partition: the multiplexer does this once a batch.
        let (consumer, topic, partitions) = (
            self.offsets.clone(),
            self.topic.clone(),
            self.partitions.clone(),
        );
        let highs = tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition_offset(&topic, *p, Offset::End).ok()?;
            }
            let ends = consumer
                .offsets_for_times(tpl, Duration::from_secs(2))
                .ok()?;
            ends.elements()
                .iter()
                .map(|e| match (e.offset(), e.error()) {
                    (Offset::Offset(high), Ok(())) => Some((e.partition(), high)),
                    _ => None,
                })
                .collect::<Option<Vec<(i32, i64)>>>()
        })
        .await
        .ok()
        .flatten();
        let Some(highs) = highs else {
            metrics::counter!("presence_catch_up_failed_total").increment(1);
            return false;
        };
        let mut rx = self.positions.clone();
        let done = |pos: &HashMap<i32, i64>| {
            highs
                .iter()
                .all(|(p, high)| pos.get(p).copied().unwrap_or(0) >= *high)
        };
        let ok = tokio::time::timeout(timeout, rx.wait_for(done)).await;
        let caught_up = matches!(ok, Ok(Ok(_)));
        if !caught_up {
            metrics::counter!("presence_catch_up_failed_total").increment(1);
        }
        caught_up
    }
}

/// Applies one presence record; returns the user and new route when it replaced the old one.
fn apply(
    routes: &RwLock<HashMap<String, Route>>,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> Option<(String, Route)> {
    let key = key.and_then(|k| std::str::from_utf8(k).ok())?;
    let mut routes = routes.write().unwrap_or_else(|p| p.into_inner());
    let Some(payload) = payload else {
        // Tombstone: the route is gone.
        routes.remove(key);
        return None;
    };
    let Ok(rec) = PresenceRecord::decode(payload) else {
        metrics::counter!("presence_invalid_records_total").increment(1);
        return None;
    };
    let Ok(gateway) = GatewayId::parse(&rec.gateway_id) else {
        metrics::counter!("presence_invalid_records_total").increment(1);
        return None;
    };
    let newer = routes.get(key).is_none_or(|r| rec.epoch >= r.epoch);
    if !newer {
        return None;
    }
    let route = Route {
        gateway,
        epoch: rec.epoch,
        online: rec.online,
    };
    routes.insert(key.to_owned(), route.clone());
    Some((key.to_owned(), route))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(gw: &str, epoch: u64, online: bool) -> Vec<u8> {
        PresenceRecord {
            user: "bob".into(),
            gateway_id: gw.into(),
            epoch,
            online,
            at_ms: 0,
        }
        .encode_to_vec()
    }

    #[test]
    fn newer_epoch_wins_and_stale_offline_is_ignored() {
        let routes = RwLock::new(HashMap::new());
        apply(&routes, Some(b"bob"), Some(&rec("gw1", 1, true)));
        apply(&routes, Some(b"bob"), Some(&rec("gw2", 2, true)));
        // gw1's offline for its older session arrives late: ignored.
        apply(&routes, Some(b"bob"), Some(&rec("gw1", 1, false)));
        let r = routes.read().expect("lock");
        assert_eq!(r["bob"].gateway.as_str(), "gw2");
        assert!(r["bob"].online);
        drop(r);
        apply(&routes, Some(b"bob"), Some(&rec("gw2", 2, false)));
        assert!(!routes.read().expect("lock")["bob"].online);
        apply(&routes, Some(b"bob"), None);
        assert!(routes.read().expect("lock").get("bob").is_none());
        // Garbage is counted and ignored.
        apply(&routes, Some(b"bob"), Some(b"\xff\xff\xff"));
        assert!(routes.read().expect("lock").get("bob").is_none());
    }
}
