//! The pipeline's producers put a keyed record on the partition Java's client would: a JVM or
//! Kafka Streams job writing to `inbound` then keeps each conversation on one partition with
//! the gateways, and so in one order.
//!
//! The pipeline's side is what the broker reports for records sent through
//! [`KafkaConfig::producer`] (the producer every service uses); Java's side is computed by the
//! Kafka client jar itself (`BuiltInPartitioner.partitionForKey`, what `KafkaProducer` calls
//! for a record with a key and no partition), run with `java` from the jars the local stack
//! installs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chat_common::ids::{ConversationKey, UserId};
use chat_common::kafka::KafkaConfig;
use chat_common::topics::{delete_topics, ensure_topics, TopicSpec};
use rdkafka::producer::FutureRecord;

const PARTITIONS: i32 = 12;
const KEYS: usize = 360;

/// Java's side: `BuiltInPartitioner.partitionForKey` for each line of a file.
const JAVA: &str = r#"
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import org.apache.kafka.clients.producer.internals.BuiltInPartitioner;

public class JavaPartitions {
    public static void main(String[] args) throws Exception {
        int partitions = Integer.parseInt(args[1]);
        for (String key : Files.readAllLines(Path.of(args[0]), StandardCharsets.UTF_8)) {
            byte[] bytes = key.getBytes(StandardCharsets.UTF_8);
            System.out.println(BuiltInPartitioner.partitionForKey(bytes, partitions));
        }
    }
}
"#;

/// The Kafka jars: `$KAFKA_HOME/libs` when set (as the stack scripts accept), else the ones
/// `make deps` installs under the state directory.
fn kafka_libs() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates = [
        std::env::var_os("KAFKA_HOME").map(|h| PathBuf::from(h).join("libs")),
        std::env::var_os("CHAT_STATE_DIR").map(|s| PathBuf::from(s).join("kafka-dist/libs")),
        Some(root.join(".local/kafka-dist/libs")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("..").exists() && has_clients_jar(d))
        .ok_or_else(|| anyhow::anyhow!("no kafka-clients jar found: run `make deps`"))
}

fn has_clients_jar(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("kafka-clients-") && name.ends_with(".jar")
        })
    })
}

/// Seeded keys shaped like the pipeline's: sorted pairs of user ids of every length and
/// character the id alphabet allows.
fn keys(seed: u64) -> Vec<String> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-";
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let id = |next: &mut dyn FnMut() -> u64| {
        let len = 1 + (next() % 64) as usize;
        let s: String = (0..len)
            .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize] as char)
            .collect();
        UserId::parse(&s).expect("generated from the id alphabet")
    };
    let mut out = Vec::with_capacity(KEYS);
    while out.len() < KEYS {
        let (a, b) = (id(&mut next), id(&mut next));
        if let Some(k) = ConversationKey::of(&a, &b) {
            out.push(k.as_str().to_owned());
        }
    }
    out
}

fn java_partitions(keys: &[String]) -> anyhow::Result<Vec<i32>> {
    let libs = kafka_libs()?;
    let dir = std::env::temp_dir().join(format!("chat-partitioner-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let source = dir.join("JavaPartitions.java");
    std::fs::write(&source, JAVA)?;
    let key_file = dir.join("keys.txt");
    std::fs::write(&key_file, keys.join("\n"))?;
    let out = std::process::Command::new("java")
        .arg("-cp")
        .arg(format!("{}/*", libs.display()))
        .arg(&source)
        .arg(&key_file)
        .arg(PARTITIONS.to_string())
        .output()
        .map_err(|e| anyhow::anyhow!("running java: {e}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(
        out.status.success(),
        "java failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| Ok(l.trim().parse::<i32>()?))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_land_where_javas_default_partitioner_puts_them() -> anyhow::Result<()> {
    let seed = std::env::var("CHAT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0);
    println!("seed {seed} (CHAT_TEST_SEED={seed} repeats it)");
    let keys = keys(seed);
    let java = tokio::task::spawn_blocking({
        let keys = keys.clone();
        move || java_partitions(&keys)
    })
    .await??;
    assert_eq!(java.len(), keys.len(), "one partition per key from java");

    let brokers = std::env::var("CHAT_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let kafka = KafkaConfig::new(brokers).with_env_opts()?;
    let topic = format!(
        "t{}-partitioner",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let spec = TopicSpec {
        partitions: PARTITIONS,
        config: Default::default(),
    };
    ensure_topics(&kafka, &[(topic.clone(), spec)], None).await?;
    let producer = kafka.producer()?;
    let mut ours = Vec::with_capacity(keys.len());
    for key in &keys {
        let delivery = producer
            .send(
                FutureRecord::to(&topic).key(key.as_str()).payload("x"),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
        ours.push(delivery.partition);
    }
    delete_topics(&kafka, &[topic]).await?;

    let disagree: Vec<_> = keys
        .iter()
        .zip(ours.iter().zip(&java))
        .filter(|(_, (o, j))| o != j)
        .collect();
    let used = ours.iter().collect::<std::collections::BTreeSet<_>>().len();
    println!(
        "{} keys over {PARTITIONS} partitions ({used} used): {} agree with Java's default",
        keys.len(),
        keys.len() - disagree.len()
    );
    assert!(
        disagree.is_empty(),
        "{} of {} keys land elsewhere than Java's default puts them, e.g. {:?}",
        disagree.len(),
        keys.len(),
        disagree.iter().take(3).collect::<Vec<_>>()
    );
    assert_eq!(
        used, PARTITIONS as usize,
        "keys spread over every partition"
    );
    Ok(())
}
