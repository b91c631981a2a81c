//! The data team's tools, run as the binaries operators run: `chatctl tail` and
//! `db-writer export`.

use std::time::Duration;

use chat_e2e::{connect, run_binary, ws_url, TestEnv, WAIT};
use serde_json::Value;

async fn run(
    name: &str,
    args: &[&str],
    env: &[(&str, String)],
) -> anyhow::Result<(i32, String, String)> {
    let (code, out, err) = run_binary(name, args, env).await?;
    Ok((code, String::from_utf8_lossy(&out).into_owned(), err))
}

fn lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_decodes_and_filters_and_export_writes_json_lines() -> anyhow::Result<()> {
    let env = TestEnv::new(2, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    let mux = env.start_multiplexer().await?;
    let alice = connect(&ws_url(gw.addr), &env.token("alice")).await;
    for i in 0..3 {
        alice.send("bob", &format!("to bob {i}")).await?;
    }
    alice.send("carol", "to carol").await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if env.message_count().await? == 4 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kafka = [
        ("KAFKA_BROKERS", env.kafka.brokers.clone()),
        ("TOPIC_PREFIX", env.topics.prefix().to_owned()),
    ];

    // tail inbound, filtered by user: only carol's message.
    let (code, out, err) = run("chatctl", &["tail", "inbound", "--user", "carol"], &kafka).await?;
    assert_eq!(code, 0, "{err}");
    let got = lines(&out);
    assert_eq!(got.len(), 1, "{out}");
    assert_eq!(got[0]["key"], "alice:carol");
    assert_eq!(got[0]["value"]["message"]["body"], "to carol");
    assert_eq!(got[0]["topic"], env.topics.inbound());

    // By conversation, bounded.
    let (_, out, _) = run(
        "chatctl",
        &[
            "tail",
            "inbound",
            "--conversation",
            "alice:bob",
            "--max",
            "2",
        ],
        &kafka,
    )
    .await?;
    let got = lines(&out);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|l| l["key"] == "alice:bob"));

    // presence and outbound decode too.
    let (_, out, _) = run("chatctl", &["tail", "presence", "--user", "alice"], &kafka).await?;
    let got = lines(&out);
    assert!(!got.is_empty());
    assert_eq!(got[0]["value"]["online"], true);
    assert_eq!(got[0]["value"]["gatewayId"], "gw1");
    let (_, out, _) = run(
        "chatctl",
        &["tail", "outbound-gw1", "--user", "alice"],
        &kafka,
    )
    .await?;
    assert!(
        lines(&out)
            .iter()
            .any(|l| l["value"]["stored"]["seq"] == "1"),
        "{out}"
    );

    // A missing topic is a clear error.
    let (code, _, err) = run("chatctl", &["tail", "outbound-nope"], &kafka).await?;
    assert_ne!(code, 0);
    assert!(err.contains("does not exist"), "{err}");

    // export: JSON lines of every message in the range.
    let file = std::env::temp_dir().join(format!("{}export.jsonl", env.topics.prefix()));
    let shards = [("SHARD_DSNS", env.shard_dsns.join(","))];
    let path = file.to_string_lossy().into_owned();
    let (code, _, err) = run(
        "db-writer",
        &["export", "--since", "ms:0", "--out", &path],
        &shards,
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    let exported = lines(&std::fs::read_to_string(&file)?);
    std::fs::remove_file(&file)?;
    assert_eq!(exported.len(), 4);
    let mut bodies: Vec<&str> = exported.iter().filter_map(|m| m["body"].as_str()).collect();
    bodies.sort();
    assert_eq!(bodies, vec!["to bob 0", "to bob 1", "to bob 2", "to carol"]);
    // An empty range, and delete-on-ack mode's refusal.
    let (_, out, _) = run(
        "db-writer",
        &["export", "--since", "ms:0", "--until", "ms:1"],
        &shards,
    )
    .await?;
    assert!(out.is_empty());
    let mut doa = shards.to_vec();
    doa.push(("RETENTION", "delete-on-ack".into()));
    let (code, _, err) = run("db-writer", &["export", "--since", "ms:0"], &doa).await?;
    assert_ne!(code, 0);
    assert!(err.contains("keep mode only"), "{err}");

    alice.close();
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}

/// `chatctl tail` decodes by the topic's role, not its name's ending: the outbound topic of a
/// gateway named `presence` is an outbound topic. `chatctl topics delete` removes a gateway's
/// outbound topic only when the presence log routes nobody there: after a graceful stop, or
/// with `--clear-presence` after a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_decoded_by_role_and_deleted_only_when_nobody_is_routed_there(
) -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["presence", "gw1"]).await?;
    let mux = env.start_multiplexer().await?;
    let odd = env.start_gateway("presence").await?;
    let mut gw1 = env.spawn_gateway_process("gw1").await?;
    let mut alice = connect(&ws_url(odd.addr), &env.token("alice")).await;
    let bob = connect(&ws_url(gw1.addr), &env.token("bob")).await;
    bob.send("alice", "via a gateway named presence").await?;
    let got = alice.next_message(WAIT).await?;
    assert_eq!(got.body, "via a gateway named presence");

    let kafka = [
        ("KAFKA_BROKERS", env.kafka.brokers.clone()),
        ("TOPIC_PREFIX", env.topics.prefix().to_owned()),
    ];
    let (code, out, err) = run(
        "chatctl",
        &["tail", "outbound-presence", "--user", "alice"],
        &kafka,
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    let pushed = lines(&out);
    assert!(
        pushed
            .iter()
            .any(|l| l["value"]["deliver"]["body"] == "via a gateway named presence"),
        "decoded as outbound: {out}"
    );
    assert!(!out.contains("undecodable"), "{out}");
    // A topic outside the deployment needs to be told how to decode.
    let (code, _, err) = run("chatctl", &["tail", "elsewhere"], &kafka).await?;
    assert_ne!(code, 0);
    assert!(err.contains("--role"), "{err}");
    let (code, out, err) = run(
        "chatctl",
        &[
            "tail",
            "outbound-presence",
            "--role",
            "presence",
            "--max",
            "1",
        ],
        &kafka,
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines(&out).len(), 1, "--role is taken at its word: {out}");

    // alice is online at `presence`: its topic stays.
    let delete = |gateway: &'static str, extra: &'static [&'static str]| {
        let mut args = vec!["topics", "delete", "--gateway", gateway];
        args.extend_from_slice(extra);
        let kafka = kafka.clone();
        async move { run("chatctl", &args, &kafka).await }
    };
    let (code, _, err) = delete("presence", &[]).await?;
    assert_ne!(code, 0);
    assert!(
        err.contains("1 users are online at presence") && err.contains("alice"),
        "{err}"
    );
    assert!(!env
        .read_topic(&outbound(&env, "presence"))
        .await?
        .is_empty());

    // A graceful stop marks alice offline; then the topic can go.
    alice.close();
    odd.stop().await;
    let (code, out, err) = delete("presence", &[]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted"), "{out}");
    let (code, _, err) = run("chatctl", &["tail", "outbound-presence"], &kafka).await?;
    assert_ne!(code, 0);
    assert!(err.contains("does not exist"), "{err}");

    // A gateway that died leaves bob online in the log: refused, then cleared.
    gw1.kill().await?;
    let (code, _, err) = delete("gw1", &[]).await?;
    assert_ne!(code, 0);
    assert!(
        err.contains("bob") && err.contains("--clear-presence"),
        "{err}"
    );
    let (code, out, err) = delete("gw1", &["--clear-presence"]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 users at gw1 marked offline"), "{out}");
    let (_, out, _) = run("chatctl", &["tail", "presence", "--user", "bob"], &kafka).await?;
    let last = lines(&out).pop().expect("bob's presence records");
    assert_ne!(last["value"]["online"], true, "offline: {last}");
    assert_eq!(last["value"]["gatewayId"], "gw1");

    drop(bob);
    mux.stop().await;
    env.teardown().await
}

fn outbound(env: &TestEnv, gateway: &str) -> String {
    env.topics
        .outbound(&chat_common::ids::GatewayId::parse(gateway).expect("valid"))
}
