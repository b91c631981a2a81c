//! Delete-on-ack reaches every copy (docs/design.md, "Crypto-shredding"). Bodies travel and
//! rest sealed under keys their shard holds, and an ack destroys the key, so:
//!
//! - the canary test: messages with unique canary bodies, acked, then the metadata window
//!   passed and `VACUUM` run; a scan of the broker's log directory and of Postgres's data
//!   directory, byte for byte, finds no canary, acked or not. The unacked ones are still
//!   delivered intact. The same scan after one message in keep mode finds it, in both (the scan
//!   can fail);
//! - a replay of `inbound` from the beginning, into the same shards and into empty ones (a
//!   rebuild): seqs and metadata come back, no body does, no key is made again.
//!
//! The scan needs the directories: `infra/scripts/test-secure.sh` (what `make test` runs)
//! exports them as `CHAT_TEST_KAFKA_DATA` and `CHAT_TEST_PG_DATA`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chat_client::Client;
use chat_e2e::{connect, eventually, seed, ws_url, Rng, TestEnv, WAIT};
use db_writer::replay::{replay, ReplayOptions, Start};
use db_writer::{Retention, ShardConfig, Shards};
use futures_util::future::try_join_all;

/// Characters of a canary after its run's prefix (its own id).
const TAIL: usize = 8;

/// The broker's log directory and Postgres's data directory of the test stack.
fn data_dirs() -> anyhow::Result<Vec<PathBuf>> {
    ["CHAT_TEST_KAFKA_DATA", "CHAT_TEST_PG_DATA"]
        .iter()
        .map(|var| {
            let dir = std::env::var(var).map_err(|_| {
                anyhow::anyhow!(
                    "{var} is not set: run this test through infra/scripts/test-secure.sh, which \
                     says where the test stack keeps its data"
                )
            })?;
            anyhow::ensure!(Path::new(&dir).is_dir(), "{var}={dir} is not a directory");
            Ok(PathBuf::from(dir))
        })
        .collect()
}

/// Every file under `dirs`, searched byte for byte for `prefix`: each canary found (the prefix's
/// [`TAIL`] characters after it) with the files it is in.
fn scan(dirs: &[PathBuf], prefix: &str) -> anyhow::Result<BTreeMap<String, BTreeSet<PathBuf>>> {
    let finder = memchr::memmem::Finder::new(prefix.as_bytes());
    let mut found: BTreeMap<String, BTreeSet<PathBuf>> = BTreeMap::new();
    let chaos::data_files::Read { files, bytes } =
        chaos::data_files::read_each(dirs, |path, content| {
            for at in finder.find_iter(content) {
                let start = at + prefix.len();
                let end = (start + TAIL).min(content.len());
                let id = String::from_utf8_lossy(&content[start..end]).into_owned();
                found.entry(id).or_default().insert(path.to_owned());
            }
        });
    println!(
        "scanned {files} files, {} MiB, for {prefix}: {} canaries found",
        bytes >> 20,
        found.len()
    );
    anyhow::ensure!(files > 0, "no file under {dirs:?}");
    Ok(found)
}

/// A run's canary prefix: unique to the run, so nothing else on disk holds it.
fn prefix(rng: &mut Rng) -> String {
    format!("canary{:016x}-", rng.next_u64())
}

/// Canary `i` of a run.
fn canary(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:0TAIL$} with some text after it")
}

/// VACUUM (as the tables' owner) on every shard: dead tuples of erased bodies and destroyed
/// keys are removed from the pages.
async fn vacuum(env: &TestEnv) -> anyhow::Result<()> {
    for i in 0..env.shard_dsns.len() {
        let db = env.shard(i).await?;
        // One statement each: a multi-statement string runs as one transaction.
        db.batch_execute("VACUUM messages").await?;
        db.batch_execute("VACUUM body_keys").await?;
        db.batch_execute("VACUUM sealing_keys").await?;
    }
    Ok(())
}

/// Rows of every shard: (conversation, seq, message id, sender, body, holds a sealed body).
type Row = (String, i64, uuid::Uuid, String, Option<String>, bool);

async fn rows_of(dsns: &[String]) -> anyhow::Result<BTreeSet<Row>> {
    let mut out = BTreeSet::new();
    for dsn in dsns {
        let db = chat_e2e::pg_connect(dsn).await?;
        let rows = db
            .query(
                "SELECT conversation, seq, message_id, sender, body, sealed IS NOT NULL
                 FROM messages",
                &[],
            )
            .await?;
        out.extend(
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))),
        );
    }
    Ok(out)
}

/// Stored messages whose key exists, over every shard (keys issued ahead that no send took yet
/// are not counted).
async fn key_count(dsns: &[String]) -> anyhow::Result<i64> {
    let mut n = 0;
    let query = format!(
        "SELECT count(*) FROM messages m WHERE {}",
        db_writer::keys::MESSAGE_KEY_EXISTS
    );
    for dsn in dsns {
        let c: i64 = chat_e2e::pg_connect(dsn)
            .await?
            .query_one(&query, &[])
            .await?
            .get(0);
        n += c;
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_canary_is_found_on_disk_once_acked_and_unacked_ones_only_sealed() -> anyhow::Result<()>
{
    let dirs = data_dirs()?;
    let seed = seed("SHREDDING_SEED");
    println!("SHREDDING_SEED={seed}");
    let mut rng = Rng(seed);

    // The control: in keep mode, a body is on disk in both places once stored. Right after the
    // commit, Postgres holds it only in the WAL, whose 8 KiB pages each begin with a header:
    // where one falls inside the canary, its bytes are split and no search finds them (58 rows
    // of 20,000 on this stack's Postgres 15, one in 345). So the body carries the canary twice:
    // one header cannot split both. Kafka's copy is lz4-compressed, which keeps the first as
    // text and may store the second, or the canary's run of zeros, as a reference back: the
    // control looks for the run's prefix, whatever follows it.
    let keep = prefix(&mut rng);
    {
        let env = TestEnv::new(1, &["gw1"]).await?;
        let gw = env.start_gateway("gw1").await?;
        let mux = env.start_multiplexer().await?;
        let alice = connect(&ws_url(gw.addr), &env.token("alice")).await;
        let body = canary(&keep, 0);
        alice.send("bob", &format!("{body} | {body}")).await?;
        eventually("the keep-mode message stored", || async {
            Ok((env.message_count().await? == 1).then_some(()))
        })
        .await?;
        let places: BTreeSet<PathBuf> = scan(&dirs, &keep)?.into_values().flatten().collect();
        for dir in &dirs {
            assert!(
                places.iter().any(|p| p.starts_with(dir)),
                "keep mode: the body is found under {dir:?} ({places:?})"
            );
        }
        alice.close();
        gw.stop().await;
        mux.stop().await;
        env.teardown().await?;
    }

    // Delete-on-ack: alice (on gw1) writes to bob and carol (on gw2), pipelined; bob acks.
    let doa = prefix(&mut rng);
    let mut env = TestEnv::new(2, &["gw1", "gw2"]).await?;
    env.retention = Retention::DeleteOnAck;
    env.expiry_interval = Duration::from_millis(200);
    env.erased_row_ttl = Duration::from_secs(1);
    let gw1 = env.start_gateway("gw1").await?;
    let gw2 = env.start_gateway("gw2").await?;
    let mux = env.start_multiplexer().await?;
    let alice = connect(&ws_url(gw1.addr), &env.token("alice")).await;
    let mut bob = connect(&ws_url(gw2.addr), &env.token("bob")).await;
    let (to_bob, to_carol) = (rng.range(5, 20), rng.range(2, 6));
    let sends = (0..to_bob)
        .map(|i| ("bob", canary(&doa, i)))
        .chain((to_bob..to_bob + to_carol).map(|i| ("carol", canary(&doa, i))))
        .collect::<Vec<_>>();
    try_join_all(sends.iter().map(|(to, body)| alice.send(to, body))).await?;
    let mut last = 0;
    let mut got = BTreeSet::new();
    for _ in 0..to_bob {
        let m = bob.next_message(WAIT).await?;
        last = last.max(m.seq);
        got.insert(m.body);
    }
    let sent: BTreeSet<String> = (0..to_bob).map(|i| canary(&doa, i)).collect();
    assert_eq!(got, sent, "bob got every body intact");
    bob.ack("alice", last)?;

    // The ack destroys the keys; the metadata window then deletes the rows.
    let owner = env.shard_dsns.clone();
    eventually("bob's keys destroyed and rows purged", || async {
        let rows = rows_of(&owner).await?;
        let bobs = rows.iter().filter(|r| r.0 == "alice:bob").count();
        Ok((bobs == 0 && key_count(&owner).await? == to_carol as i64).then_some(()))
    })
    .await?;
    // Carol's are pending, sealed: delivered intact, never as text in a row.
    let mut carol = Client::connect(&ws_url(gw2.addr), &env.token("carol")).await?;
    let carols: BTreeSet<String> = carol
        .until_sync_done(WAIT)
        .await?
        .into_iter()
        .map(|m| m.body)
        .collect();
    let expected: BTreeSet<String> = (to_bob..to_bob + to_carol)
        .map(|i| canary(&doa, i))
        .collect();
    assert_eq!(carols, expected, "carol got every body intact");
    let rows = rows_of(&owner).await?;
    assert_eq!(rows.len(), to_carol);
    assert!(
        rows.iter().all(|r| r.4.is_none() && r.5),
        "pending rows hold sealed bodies only: {rows:?}"
    );
    // The conversation kept its counter.
    let last_seq: i64 = env
        .shard(
            db_writer::Locator::new(2)
                .shard_of(&chat_common::ids::ConversationKey::parse("alice:bob")?),
        )
        .await?
        .query_one(
            "SELECT last_seq FROM conversations WHERE conversation = 'alice:bob'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(last_seq, to_bob as i64);

    // The services' metrics never carry a body.
    for addr in [gw1.ops_addr, gw2.ops_addr, mux.ops_addr] {
        let r = chat_client::Rest::new(&chat_e2e::http_url(addr))
            .request("GET", "/metrics", None, None)
            .await?;
        let text = r.body.as_str().unwrap_or_default();
        assert!(
            text.contains("gateway_") || text.contains("multiplexer_"),
            "{addr}: a scrape"
        );
        assert!(!text.contains(&doa), "{addr}: a body in the metrics");
    }

    vacuum(&env).await?;
    let found = scan(&dirs, &doa)?;
    assert!(
        found.is_empty(),
        "delete-on-ack: {} canaries found on disk: {found:?}",
        found.len()
    );

    alice.close();
    bob.close();
    carol.close();
    gw1.stop().await;
    gw2.stop().await;
    mux.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_rebuilds_seqs_and_metadata_and_never_a_body() -> anyhow::Result<()> {
    let mut env = TestEnv::new(2, &["gw1"]).await?;
    env.retention = Retention::DeleteOnAck;
    let gw = env.start_gateway("gw1").await?;
    let mux = env.start_multiplexer().await?;
    let alice = connect(&ws_url(gw.addr), &env.token("alice")).await;
    let mut bob = connect(&ws_url(gw.addr), &env.token("bob")).await;
    for i in 0..6 {
        alice.send("bob", &format!("secret {i}")).await?;
    }
    let mut seqs = Vec::new();
    for _ in 0..6 {
        seqs.push(bob.next_message(WAIT).await?.seq);
    }
    bob.ack("alice", 4)?; // 5 and 6 stay pending
    let owner = env.shard_dsns.clone();
    eventually("keys of 1..=4 destroyed", || async {
        Ok((key_count(&owner).await? == 2).then_some(()))
    })
    .await?;
    // Every row keeps its sealed bytes (the ack rewrites none); only 5 and 6 can still open.
    let before = rows_of(&owner).await?;
    let sealed: Vec<i64> = before.iter().filter(|r| r.5).map(|r| r.1).collect();
    assert_eq!(sealed, vec![1, 2, 3, 4, 5, 6]);
    assert!(before.iter().all(|r| r.4.is_none()), "no body as text");
    mux.stop().await;

    // Into the same shards: nothing changes, no key comes back.
    let kafka = env.kafka.clone();
    let options = |env: &TestEnv| ReplayOptions {
        topic: env.topics.inbound(),
        group: format!(
            "{}replay-{}",
            env.topics.prefix(),
            uuid::Uuid::new_v4().simple()
        ),
        start: Start::Beginning,
        retention: Retention::DeleteOnAck,
        max_batch: 50,
    };
    let same = Shards::connect(&ShardConfig::from_list(&owner.join(","), 2)?)?;
    let summary = replay(&same, &kafka, &options(&env), &mut |_, _| {}).await?;
    println!("replay into the same shards: {summary:?}");
    assert_eq!(rows_of(&owner).await?, before, "the same rows");
    assert_eq!(key_count(&owner).await?, 2, "no key made again");

    // Into empty shards (a rebuild): every seq and message id back, no body (the keys were in
    // the shards lost), bob's watermark rebuilt.
    let fresh = env.extra_shards(2).await?;
    let rebuilt = Shards::connect(&ShardConfig::from_list(&fresh.join(","), 2)?)?;
    let summary = replay(&rebuilt, &kafka, &options(&env), &mut |_, _| {}).await?;
    println!("replay into empty shards: {summary:?}");
    let after = rows_of(&fresh).await?;
    let strip = |rows: &BTreeSet<Row>| -> BTreeSet<(String, i64, uuid::Uuid, String)> {
        rows.iter()
            .map(|r| (r.0.clone(), r.1, r.2, r.3.clone()))
            .collect()
    };
    assert_eq!(strip(&after), strip(&before), "seqs and metadata rebuilt");
    assert!(
        after.iter().all(|r| r.4.is_none() && !r.5),
        "no body rebuilt: {after:?}"
    );
    assert_eq!(key_count(&fresh).await?, 0);
    let mut watermark = 0i64;
    for dsn in &fresh {
        let rows = chat_e2e::pg_connect(dsn)
            .await?
            .query("SELECT up_to_seq FROM acks WHERE recipient = 'bob'", &[])
            .await?;
        for r in rows {
            watermark = r.get(0);
        }
    }
    assert_eq!(watermark, 4);

    // Bob, reconnecting, still gets the pending two intact from the live shards.
    bob.close();
    let mut bob = Client::connect(&ws_url(gw.addr), &env.token("bob")).await?;
    let pending: Vec<String> = bob
        .until_sync_done(WAIT)
        .await?
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert_eq!(pending, vec!["secret 4".to_owned(), "secret 5".to_owned()]);
    alice.close();
    bob.close();
    gw.stop().await;
    env.teardown().await
}

/// A client's retries (the same client message id sent again: pipelined, and again after a
/// reconnect to another gateway) are each sealed under a key of their own. The store keeps one message and destroys the keys of the copies it skips, so once the
/// recipient acks, no record of `inbound` opens: none carries a key that still exists. Seeded
/// (`SHREDDING_RETRY_SEED` replays a run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_leaves_no_copy_that_opens_after_the_ack() -> anyhow::Result<()> {
    use chat_proto::v1::{inbound_record, InboundRecord};
    use prost::Message as _;

    let seed = seed("SHREDDING_RETRY_SEED");
    println!("SHREDDING_RETRY_SEED={seed}");
    let mut rng = Rng(seed);
    let mut env = TestEnv::new(2, &["gw1", "gw2"]).await?;
    env.retention = Retention::DeleteOnAck;
    let gw1 = env.start_gateway("gw1").await?;
    let gw2 = env.start_gateway("gw2").await?;
    let mux = env.start_multiplexer().await?;
    let alice = connect(&ws_url(gw1.addr), &env.token("alice")).await;
    let mut bob = connect(&ws_url(gw1.addr), &env.token("bob")).await;
    let odd = [
        "\u{1F600}",
        "\u{202E}rtl",
        "\"quoted\"",
        "tab\tline\nbreak",
        "\\",
        "ß",
    ];
    let sends: Vec<(String, String, usize)> = (0..rng.range(10, 30))
        .map(|i| {
            let body = format!("retried {i} {}", odd[rng.below(odd.len())]);
            (format!("retry-{seed:x}-{i}"), body, 1 + rng.below(3))
        })
        .collect();
    let mut copies_sent: usize = sends.iter().map(|s| s.2).sum();
    try_join_all(sends.iter().flat_map(|(id, body, copies)| {
        let alice = &alice;
        (0..*copies).map(move |_| alice.send_with_id(id, "bob", body))
    }))
    .await?;
    // Some sent again from another gateway, as a client does after a reconnect.
    alice.close();
    let alice = connect(&ws_url(gw2.addr), &env.token("alice")).await;
    let again: Vec<_> = sends.iter().filter(|_| rng.chance(30)).collect();
    copies_sent += again.len();
    try_join_all(
        again
            .iter()
            .map(|(id, body, _)| alice.send_with_id(id, "bob", body)),
    )
    .await?;

    // Bob gets each message once, intact, and acks them all.
    let mut got = BTreeMap::new();
    while got.len() < sends.len() {
        let m = bob.next_message(WAIT).await?;
        got.insert(m.seq, m.body);
    }
    let bodies: BTreeSet<String> = got.values().cloned().collect();
    let sent: BTreeSet<String> = sends.iter().map(|s| s.1.clone()).collect();
    assert_eq!(bodies, sent, "each message once, intact");
    let last = *got.keys().last().expect("messages");
    assert_eq!(last as usize, sends.len(), "one seq each");
    bob.ack("alice", last)?;
    let owner = env.shard_dsns.clone();
    eventually("every stored message's key destroyed", || async {
        Ok((key_count(&owner).await? == 0).then_some(()))
    })
    .await?;

    // Every copy on `inbound` is sealed under a key of its own, and none of them is left.
    let mut key_ids = BTreeSet::new();
    let mut copies = 0;
    for record in env.read_topic(&env.topics.inbound()).await? {
        let Some(payload) = rdkafka::Message::payload(&record) else {
            continue;
        };
        if let Some(inbound_record::Kind::Message(m)) = InboundRecord::decode(payload)?.kind {
            assert!(m.body.is_empty(), "a body in the clear on inbound");
            let id = chat_common::seal::BodyKeyId::of(&m.sealed_body)
                .ok_or_else(|| anyhow::anyhow!("a copy sealed without a key id"))?;
            key_ids.insert(id.as_bytes().to_vec());
            copies += 1;
        }
    }
    println!(
        "{} messages, {copies_sent} sends, {copies} copies on inbound",
        sends.len()
    );
    assert!(copies >= sends.len(), "{copies} copies");
    assert_eq!(
        key_ids.len(),
        copies,
        "each copy sealed under a key of its own"
    );
    let key_ids: Vec<Vec<u8>> = key_ids.into_iter().collect();
    for dsn in &owner {
        let left: i64 = chat_e2e::pg_connect(dsn)
            .await?
            .query_one(
                "SELECT count(*) FROM sealing_keys WHERE id = ANY($1)",
                &[&key_ids],
            )
            .await?
            .get(0);
        assert_eq!(left, 0, "a copy on inbound still opens");
    }

    alice.close();
    bob.close();
    gw1.stop().await;
    gw2.stop().await;
    mux.stop().await;
    env.teardown().await
}
