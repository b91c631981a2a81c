//! The services' Kafka clients against a broker that takes only TLS with SCRAM and enforces
//! ACLs (`infra/scripts/kafka.sh start --secure`, started here when it is not running): a
//! plaintext client, a wrong password and an untrusted certificate are refused; the admin user
//! creates, writes and reads a topic; a service user with no ACL on that topic can neither
//! write nor read it. With the deployment's ACLs (`infra/scripts/kafka-acls.sh`), gateways and
//! a multiplexer each running as their own user carry messages end to end, and a gateway's user
//! can neither read another gateway's pushes nor write pushes itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chat_common::kafka::{KafkaConfig, KafkaSecurity};
use chat_common::topics::{delete_topics, ensure_topics, standard_topics, TopicSpec};
use chat_e2e::{connect, ws_url, TestEnv, WAIT};
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

const BROKER: &str = "127.0.0.1:9094";
const TIMEOUT: Duration = Duration::from_secs(10);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The secured broker's state: its CA and its users' passwords.
fn secure_dir() -> PathBuf {
    std::env::var_os("CHAT_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".local"))
        .join("kafka-secure")
}

/// Starts the secured broker unless it runs (the script returns at once then).
fn secured_broker() -> anyhow::Result<()> {
    let out = std::process::Command::new(root().join("infra/scripts/kafka.sh"))
        .args(["start", "--secure"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "starting the secured broker: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn password(user: &str) -> anyhow::Result<String> {
    Ok(
        std::fs::read_to_string(secure_dir().join("users").join(user))?
            .trim()
            .to_owned(),
    )
}

fn as_user(user: &str, password: String, ca: Option<PathBuf>) -> KafkaConfig {
    KafkaConfig {
        security: KafkaSecurity::SaslSsl {
            ca_file: ca,
            mechanism: "SCRAM-SHA-512".into(),
            username: user.into(),
            password,
        },
        ..KafkaConfig::new(BROKER)
    }
}

fn ca() -> Option<PathBuf> {
    Some(secure_dir().join("tls/ca.crt"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tls_with_scram_gets_in_and_acls_hold() -> anyhow::Result<()> {
    tokio::task::spawn_blocking(secured_broker).await??;
    let admin = as_user("admin", password("admin")?, ca());

    // Refused: plaintext, a wrong password, a broker certificate the client does not trust.
    let refused = |k: KafkaConfig, what: &'static str| async move {
        let r = tokio::task::spawn_blocking(move || k.check_reachable(TIMEOUT)).await?;
        anyhow::ensure!(r.is_err(), "{what} got in");
        Ok::<_, anyhow::Error>(())
    };
    refused(KafkaConfig::new(BROKER), "a plaintext client").await?;
    refused(
        as_user("gateway-gw1", "not-the-password".into(), ca()),
        "a wrong password",
    )
    .await?;
    refused(
        as_user("admin", password("admin")?, None),
        "a client without the broker's CA",
    )
    .await?;

    // The admin user (a super user) makes a topic, writes and reads it.
    let topic = format!(
        "t{}-secured",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let spec = TopicSpec {
        partitions: 1,
        config: Default::default(),
    };
    ensure_topics(&admin, &[(topic.clone(), spec)], None).await?;
    admin
        .producer()?
        .send(
            FutureRecord::to(&topic).key("k").payload("over TLS"),
            TIMEOUT,
        )
        .await
        .map_err(|(e, _)| e)?;
    let reader = admin.reader()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning)?;
    reader.assign(&tpl)?;
    let m = tokio::time::timeout(TIMEOUT, reader.recv()).await??;
    assert_eq!(m.payload(), Some(&b"over TLS"[..]));

    // A service user authenticates, but holds no ACL on this topic: refused both ways.
    let gw1 = as_user("gateway-gw1", password("gateway-gw1")?, ca());
    let write = gw1
        .producer()?
        .send(FutureRecord::to(&topic).key("k").payload("x"), TIMEOUT)
        .await;
    let err = write.expect_err("gw1 wrote a topic it has no ACL on").0;
    assert!(
        format!("{err}").contains("Authorization"),
        "refused for its authorization: {err}"
    );
    let reader = gw1.reader()?;
    reader.assign(&tpl)?;
    let read = tokio::time::timeout(TIMEOUT, reader.recv()).await?;
    let err = read.expect_err("gw1 read a topic it has no ACL on");
    assert!(format!("{err}").contains("Authorization"), "{err}");

    delete_topics(&admin, &[topic]).await?;
    Ok(())
}

/// Creates the deployment's ACLs for `prefix` and `gateways` on the secured broker.
fn acls(prefix: &str, gateways: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new(root().join("infra/scripts/kafka-acls.sh"))
        .args(["--prefix", prefix, "--gateways", gateways])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "creating ACLs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_runs_as_its_own_user_with_only_what_it_needs() -> anyhow::Result<()> {
    tokio::task::spawn_blocking(secured_broker).await??;
    // The shards and the names of a test of its own; its topics live on the secured broker.
    let env = TestEnv::new(2, &["gw1", "gw2"]).await?;
    let prefix = env.topics.prefix().to_owned();
    let admin = as_user("admin", password("admin")?, ca());
    let topics = standard_topics(&env.topics, &env.gateway_ids);
    ensure_topics(&admin, &topics, None).await?;
    tokio::task::spawn_blocking({
        let prefix = prefix.clone();
        move || acls(&prefix, "gw1,gw2")
    })
    .await??;

    let user = |name: &str| -> anyhow::Result<KafkaConfig> {
        Ok(KafkaConfig {
            linger: Duration::ZERO,
            ..as_user(name, password(name)?, ca())
        })
    };
    let mux_kafka = user("multiplexer")?;
    let mux = env
        .start_multiplexer_with(move |c| c.kafka = mux_kafka)
        .await?;
    let (k1, k2) = (user("gateway-gw1")?, user("gateway-gw2")?);
    let gw1 = env.start_gateway_with("gw1", move |c| c.kafka = k1).await?;
    let gw2 = env.start_gateway_with("gw2", move |c| c.kafka = k2).await?;

    let alice = connect(&ws_url(gw1.addr), &env.token("alice")).await;
    let mut bob = connect(&ws_url(gw2.addr), &env.token("bob")).await;
    alice.send("bob", "over TLS, as gateway-gw1").await?;
    let got = bob.next_message(WAIT).await?;
    assert_eq!(got.body, "over TLS, as gateway-gw1");
    assert_eq!(got.seq, 1);

    // gateway-gw1 may not read gw2's pushes, nor write pushes of its own.
    let gw1_user = user("gateway-gw1")?;
    let outbound_gw2 = env.topics.outbound(&env.gateway_ids[1]);
    let reader = gw1_user.reader()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&outbound_gw2, 0, Offset::Beginning)?;
    reader.assign(&tpl)?;
    let err = tokio::time::timeout(TIMEOUT, reader.recv())
        .await?
        .expect_err("gateway-gw1 read gw2's outbound topic");
    assert!(format!("{err}").contains("Authorization"), "{err}");
    // Writes the broker refuses: the client gets an error (an authorization error, or its
    // queue purged once the topic is known to be forbidden) and nothing lands.
    let refused_write = |k: KafkaConfig, topic: String| async move {
        let r = k
            .producer()?
            .send(
                FutureRecord::to(&topic).key("bob").payload("forged"),
                TIMEOUT,
            )
            .await;
        anyhow::ensure!(r.is_err(), "{topic} took a write it should have refused");
        Ok::<_, anyhow::Error>(())
    };
    let outbound_gw1 = env.topics.outbound(&env.gateway_ids[0]);
    refused_write(user("gateway-gw1")?, outbound_gw1.clone()).await?;
    refused_write(user("data")?, env.topics.inbound()).await?;
    for topic in [outbound_gw1, env.topics.inbound()] {
        let reader = admin.reader()?;
        let md = reader.fetch_metadata(Some(&topic), TIMEOUT)?;
        let mut tpl = TopicPartitionList::new();
        let mut left = 0;
        for p in md.topics()[0].partitions() {
            let (low, high) = reader.fetch_watermarks(&topic, p.id(), TIMEOUT)?;
            if high > low {
                tpl.add_partition_offset(&topic, p.id(), Offset::Offset(low))?;
                left += high - low;
            }
        }
        if left == 0 {
            continue;
        }
        reader.assign(&tpl)?;
        while left > 0 {
            let m = tokio::time::timeout(TIMEOUT, reader.recv()).await??;
            assert_ne!(
                m.payload(),
                Some(&b"forged"[..]),
                "a forged record in {topic}"
            );
            left -= 1;
        }
    }

    alice.close();
    bob.close();
    gw1.stop().await;
    gw2.stop().await;
    mux.stop().await;
    let names = topics.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    delete_topics(&admin, &names).await?;
    env.teardown().await
}
