//! The services' Kafka clients against a broker that takes only TLS with SCRAM and enforces
//! ACLs (`infra/scripts/kafka.sh start --secure`, started here when it is not running): a
//! plaintext client, a wrong password and an untrusted certificate are refused; the admin user
//! creates, writes and reads a topic; a service user with no ACL on that topic can neither
//! write nor read it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chat_common::kafka::{KafkaConfig, KafkaSecurity};
use chat_common::topics::{delete_topics, ensure_topics, TopicSpec};
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
        as_user("gw1", "not-the-password".into(), ca()),
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
    let gw1 = as_user("gw1", password("gw1")?, ca());
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
