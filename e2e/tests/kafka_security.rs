//! The services' Kafka clients against a broker that takes only TLS with SCRAM and enforces
//! ACLs (`infra/scripts/kafka.sh start --secure`, started here when it is not running): a
//! plaintext client, a wrong password and an untrusted certificate are refused; the admin user
//! creates, writes and reads a topic; a service user with no ACL on that topic can neither
//! write nor read it. With the deployment's ACLs (`infra/scripts/kafka-acls.sh`, which runs
//! `chatctl acls`), gateways and a multiplexer each running as their own user carry messages end
//! to end, a gateway's user can neither read another gateway's pushes nor write pushes itself,
//! and the data user tails topics with `chatctl tail`. `chatctl kafka-users` creates a user that
//! can then log in, changes its password and deletes it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chat_common::kafka::{read_next, KafkaConfig, KafkaSecurity};
use chat_common::topics::{delete_topics, ensure_topics, standard_topics, TopicSpec};
use chat_e2e::{binary, connect, ws_url, TestEnv, WAIT};
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

/// Expects the broker to refuse `reader` the topic of `tpl` (one topic, a record on it): its
/// metadata and offsets are refused for the topic's authorization, and reading it yields no
/// record. The reader's nominal group is refused too (it is nobody's), which proves nothing
/// about the topic: `read_next` passes over it, as the project's readers do. (Before, these
/// checks took that group refusal for the topic's.)
async fn read_refused(
    reader: chat_common::kafka::Reader,
    tpl: &TopicPartitionList,
) -> anyhow::Result<()> {
    use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
    let elements = tpl.elements();
    let (topic, partition) = (elements[0].topic(), elements[0].partition());
    let md = reader.fetch_metadata(Some(topic), TIMEOUT)?;
    let err = md.topics().first().and_then(|t| t.error());
    anyhow::ensure!(
        err == Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED),
        "{topic}'s metadata not refused for its authorization: {err:?}"
    );
    let marks = reader.fetch_watermarks(topic, partition, TIMEOUT);
    anyhow::ensure!(marks.is_err(), "{topic}'s offsets given: {marks:?}");
    reader.assign(tpl)?;
    match tokio::time::timeout(TIMEOUT, read_next(&reader)).await {
        Err(_elapsed) => Ok(()),
        Ok(Ok(m)) => anyhow::bail!("read a record of {} it has no ACL on", m.topic()),
        Ok(Err(e)) => {
            anyhow::ensure!(
                e.rdkafka_error_code() == Some(RDKafkaErrorCode::TopicAuthorizationFailed),
                "reading {topic} failed otherwise than refused: {e}"
            );
            Ok(())
        }
    }
}

/// `chatctl` as `user` of the secured broker (not the environment's Kafka, which may be another
/// broker), with `stdin` as its standard input: exit code, stdout, stderr.
fn chatctl(user: &str, args: &[&str], stdin: &str) -> anyhow::Result<(i32, String, String)> {
    use std::io::Write;
    let ca = secure_dir().join("tls/ca.crt");
    let mut child = std::process::Command::new(binary("chatctl"))
        .args(args)
        .env("KAFKA_BROKERS", BROKER)
        .env("KAFKA_SECURITY_PROTOCOL", "sasl_ssl")
        .env("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
        .env("KAFKA_SASL_USERNAME", user)
        .env("KAFKA_SASL_PASSWORD", password(user)?)
        .env("KAFKA_CA_FILE", ca)
        .env_remove("TOPIC_PREFIX")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
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
    read_refused(gw1.reader()?, &tpl).await?;

    delete_topics(&admin, &[topic]).await?;
    Ok(())
}

/// Creates the deployment's ACLs for `prefix` and `gateways` on the secured broker.
fn acls(prefix: &str, gateways: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new(root().join("infra/scripts/kafka-acls.sh"))
        .args(["--prefix", prefix, "--gateways", gateways])
        .env("CHATCTL", binary("chatctl"))
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
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&outbound_gw2, 0, Offset::Beginning)?;
    read_refused(gw1_user.reader()?, &tpl).await?;
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
    for topic in [outbound_gw1.clone(), env.topics.inbound()] {
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

    // The data user tails gw2's pushes with chatctl (its reader's group is refused, which
    // stopped the tail before), and the ACLs are what the broker lists.
    let (code, out, err) = chatctl(
        "data",
        &["tail", "outbound-gw2", "--max", "1", "--prefix", &prefix],
        "",
    )?;
    assert_eq!(code, 0, "chatctl tail as data: {err}");
    assert!(
        out.contains("over TLS, as gateway-gw1"),
        "tail printed: {out}"
    );
    let (code, out, err) = chatctl("admin", &["acls", "list", "--user", "gateway-gw1"], "")?;
    assert_eq!(code, 0, "chatctl acls list: {err}");
    let own = format!("User:gateway-gw1 ALLOW READ TOPIC LITERAL {outbound_gw1}");
    assert!(out.lines().any(|l| l == own), "{own} not among:\n{out}");
    assert!(
        !out.contains(&outbound_gw2),
        "gw1 holds an ACL on gw2's topic:\n{out}"
    );

    alice.close();
    bob.close();
    gw1.stop().await;
    gw2.stop().await;
    mux.stop().await;
    let names = topics.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    delete_topics(&admin, &names).await?;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chatctl_creates_a_kafka_user_changes_its_password_and_deletes_it() -> anyhow::Result<()> {
    tokio::task::spawn_blocking(secured_broker).await??;
    let user = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let first = uuid::Uuid::new_v4().to_string();
    let second = uuid::Uuid::new_v4().to_string();
    let logs_in = |pw: &str| {
        let k = as_user(&user, pw.to_owned(), ca());
        tokio::task::spawn_blocking(move || k.check_reachable(TIMEOUT).is_ok())
    };
    assert!(
        !logs_in(&first).await?,
        "{user} logged in before it was created"
    );

    // The password is read from standard input, never from the arguments.
    let set = |pw: String| {
        let user = user.clone();
        tokio::task::spawn_blocking(move || {
            chatctl("admin", &["kafka-users", "set", &user], &(pw + "\n"))
        })
    };
    let (code, _, err) = set(first.clone()).await??;
    assert_eq!(code, 0, "kafka-users set: {err}");
    assert!(
        logs_in(&first).await?,
        "{user} cannot log in with its password"
    );

    let (code, _, err) = set(second.clone()).await??;
    assert_eq!(code, 0, "kafka-users set again: {err}");
    assert!(logs_in(&second).await?, "the new password does not work");
    assert!(!logs_in(&first).await?, "the old password still works");

    // A user that may not alter credentials is refused, and says so.
    let (code, _, err) = chatctl("data", &["kafka-users", "delete", &user], "")?;
    assert_ne!(code, 0, "the data user deleted a user");
    assert!(err.contains("CLUSTER_AUTHORIZATION_FAILED"), "{err}");

    let (code, _, err) = chatctl("admin", &["kafka-users", "delete", &user], "")?;
    assert_eq!(code, 0, "kafka-users delete: {err}");
    assert!(
        !logs_in(&second).await?,
        "{user} logs in after its deletion"
    );
    let (code, _, err) = chatctl("admin", &["kafka-users", "delete", &user], "")?;
    assert_ne!(code, 0, "deleting a user that is gone succeeded");
    assert!(err.contains("RESOURCE_NOT_FOUND"), "{err}");
    Ok(())
}
