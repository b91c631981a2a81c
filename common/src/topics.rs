//! Topic names and settings, in one place.
//!
//! Names: `inbound`, `inbound-dlq`, `outbound-<gateway_id>`, `presence`, each with an optional
//! prefix so tests
//! (and several stacks on one cluster) stay apart. Settings come from `infra/topics.json`, which
//! Terraform reads too. Topics are created explicitly ([`ensure_topics`]); brokers run with
//! auto-creation off.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use serde::Deserialize;

use crate::ids::GatewayId;
use crate::kafka::{KafkaConfig, KafkaError};

/// The shared topic settings file.
pub const TOPICS_JSON: &str = include_str!("../../infra/topics.json");

/// Partition count and topic-level configuration of one kind of topic.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct TopicSpec {
    pub partitions: i32,
    pub config: BTreeMap<String, String>,
}

/// Settings of the four kinds of topic.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct TopicSpecs {
    pub inbound: TopicSpec,
    /// The dead letters of `inbound`: few records, kept long enough for an operator to look.
    #[serde(rename = "inbound-dlq")]
    pub inbound_dlq: TopicSpec,
    pub outbound: TopicSpec,
    pub presence: TopicSpec,
}

impl TopicSpecs {
    /// The settings from `infra/topics.json` (checked by a unit test, so this cannot fail at run time).
    pub fn standard() -> Self {
        serde_json::from_str(TOPICS_JSON).expect("infra/topics.json is valid (unit-tested)")
    }
}

/// Topic names of one deployment (or one test).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicNames {
    prefix: String,
}

impl TopicNames {
    /// Names with a prefix (`""` in production; a random one per test).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn inbound(&self) -> String {
        format!("{}inbound", self.prefix)
    }
    /// Records of `inbound` that can never be processed (values `chat.v1.DeadLetter`).
    pub fn inbound_dlq(&self) -> String {
        format!("{}inbound-dlq", self.prefix)
    }
    pub fn presence(&self) -> String {
        format!("{}presence", self.prefix)
    }
    pub fn outbound(&self, gateway: &GatewayId) -> String {
        format!("{}outbound-{}", self.prefix, gateway.as_str())
    }
    /// The consumer group of `gateway`'s outbound topic (chatctl's ACLs spell it out, as the
    /// infrastructure tests compare them with Terraform's text).
    pub fn gateway_group(&self, gateway: &GatewayId) -> String {
        format!("{}gateway-{}", self.prefix, gateway.as_str())
    }

    /// What the topic `name` is in this deployment, by its whole name (never by a suffix: the
    /// outbound topic of a gateway named `presence` is `outbound-presence`, an outbound topic).
    /// `None` for a name that is not one of the deployment's topics.
    pub fn role(&self, name: &str) -> Option<TopicRole> {
        let rest = name.strip_prefix(self.prefix.as_str())?;
        match rest {
            "inbound" => Some(TopicRole::Inbound),
            "inbound-dlq" => Some(TopicRole::DeadLetters),
            "presence" => Some(TopicRole::Presence),
            _ => rest
                .strip_prefix("outbound-")
                .and_then(|g| GatewayId::parse(g).ok())
                .map(TopicRole::Outbound),
        }
    }
}

/// The kinds of topic, by what their records are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicRole {
    /// `inbound`: `chat.v1.InboundRecord`.
    Inbound,
    /// `inbound-dlq`: `chat.v1.DeadLetter`.
    DeadLetters,
    /// `presence`: `chat.v1.PresenceRecord`.
    Presence,
    /// `outbound-<gateway>`: `chat.v1.OutboundRecord`.
    Outbound(GatewayId),
}

impl std::str::FromStr for TopicRole {
    type Err = String;

    /// `inbound`, `inbound-dlq`, `presence` or `outbound` (of no gateway in particular).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "inbound" => Ok(Self::Inbound),
            "inbound-dlq" => Ok(Self::DeadLetters),
            "presence" => Ok(Self::Presence),
            "outbound" => Ok(Self::Outbound(
                GatewayId::parse("any").expect("a valid gateway id"),
            )),
            other => Err(format!(
                "unknown role {other:?}: expected inbound, inbound-dlq, presence or outbound"
            )),
        }
    }
}

/// Replication settings that depend on the cluster, not on the topic.
#[derive(Clone, Copy, Debug)]
pub struct Replication {
    pub factor: i32,
    pub min_insync: i32,
}

impl Replication {
    /// RF 1 for a single local broker; RF 3 with min.insync.replicas 2 for a cluster of 3 or more.
    pub fn for_brokers(brokers: usize) -> Self {
        if brokers >= 3 {
            Self {
                factor: 3,
                min_insync: 2,
            }
        } else {
            Self {
                factor: 1,
                min_insync: 1,
            }
        }
    }
}

/// Creates the given topics with their settings; topics that already exist are left as they are.
pub async fn ensure_topics(
    kafka: &KafkaConfig,
    topics: &[(String, TopicSpec)],
    replication: Option<Replication>,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = kafka.client_config().create()?;
    let replication = match replication {
        Some(r) => r,
        None => {
            let md = admin
                .inner()
                .fetch_metadata(None, Duration::from_secs(10))?;
            Replication::for_brokers(md.brokers().len())
        }
    };
    let min_isr = replication.min_insync.to_string();
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, spec)| {
            let mut t = NewTopic::new(
                name,
                spec.partitions,
                TopicReplication::Fixed(replication.factor),
            );
            for (k, v) in &spec.config {
                t = t.set(k, v);
            }
            t.set("min.insync.replicas", &min_isr)
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(new_topics.iter(), &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(KafkaError::CreateTopic { name, code }),
        }
    }
    // The controller has the topics; a broker's metadata can lag behind it for a moment, and a
    // process started right after (a multiplexer checking its dead-letter topic) would be told
    // the topic does not exist. Return once the broker lists every partition with a leader.
    let names: Vec<String> = topics.iter().map(|(n, _)| n.clone()).collect();
    let client = admin.inner();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let md = client.fetch_metadata(None, Duration::from_secs(10))?;
        let ready = names.iter().all(|name| {
            md.topics().iter().any(|t| {
                t.name() == name
                    && t.error().is_none()
                    && !t.partitions().is_empty()
                    && t.partitions().iter().all(|p| p.leader() >= 0)
            })
        });
        if ready {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let name = names.join(", ");
            return Err(KafkaError::CreateTopic {
                name,
                code: RDKafkaErrorCode::LeaderNotAvailable,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes topics (tests clean up after themselves with it). Missing topics are not an error.
pub async fn delete_topics(kafka: &KafkaConfig, names: &[String]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = kafka.client_config().create()?;
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.delete_topics(&refs, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((name, code)) => return Err(KafkaError::CreateTopic { name, code }),
        }
    }
    Ok(())
}

/// The standard set of topics for a deployment with the given gateways.
pub fn standard_topics(names: &TopicNames, gateways: &[GatewayId]) -> Vec<(String, TopicSpec)> {
    let specs = TopicSpecs::standard();
    let mut v = vec![
        (names.inbound(), specs.inbound.clone()),
        (names.inbound_dlq(), specs.inbound_dlq.clone()),
        (names.presence(), specs.presence.clone()),
    ];
    v.extend(
        gateways
            .iter()
            .map(|g| (names.outbound(g), specs.outbound.clone())),
    );
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_json_parses_with_required_settings() {
        let specs = TopicSpecs::standard();
        assert_eq!(specs.inbound.partitions, 12);
        assert_eq!(specs.presence.config["cleanup.policy"], "compact");
        assert_eq!(specs.inbound.config["cleanup.policy"], "delete");
        assert_eq!(specs.inbound_dlq.config["cleanup.policy"], "delete");
        // A dead letter holds an inbound record whole, so it must fit what inbound accepts.
        let max = |s: &TopicSpec| {
            s.config["max.message.bytes"]
                .parse::<u64>()
                .expect("a number")
        };
        assert!(max(&specs.inbound_dlq) > max(&specs.inbound));
    }

    #[test]
    fn names_carry_prefix_and_gateway() {
        let n = TopicNames::new("t1-");
        let g = GatewayId::parse("gw-2").expect("valid");
        assert_eq!(n.inbound(), "t1-inbound");
        assert_eq!(n.inbound_dlq(), "t1-inbound-dlq");
        assert_eq!(n.presence(), "t1-presence");
        assert_eq!(n.outbound(&g), "t1-outbound-gw-2");
        assert_eq!(standard_topics(&n, &[g]).len(), 4);
    }

    #[test]
    fn role_is_read_from_the_whole_name() {
        let n = TopicNames::new("t1-");
        let gw = |s: &str| GatewayId::parse(s).expect("valid");
        assert_eq!(n.role("t1-inbound"), Some(TopicRole::Inbound));
        assert_eq!(n.role("t1-inbound-dlq"), Some(TopicRole::DeadLetters));
        assert_eq!(n.role("t1-presence"), Some(TopicRole::Presence));
        // Gateways named like the other topics keep their outbound role.
        for name in ["presence", "inbound", "inbound-dlq", "gw1"] {
            let topic = n.outbound(&gw(name));
            assert_eq!(
                n.role(&topic),
                Some(TopicRole::Outbound(gw(name))),
                "{topic}"
            );
        }
        // Not this deployment's topics.
        for other in [
            "inbound",
            "t2-inbound",
            "t1-replay-inbound",
            "t1-outbound-",
            "t1-x",
        ] {
            assert_eq!(n.role(other), None, "{other}");
        }
        assert_eq!(
            TopicNames::new("").role("presence"),
            Some(TopicRole::Presence)
        );
    }
}
