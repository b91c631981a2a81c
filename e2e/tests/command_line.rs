//! Every binary of the workspace answers `--help` and `--version` and does nothing else: exit 0,
//! text on stdout, nothing on stderr (no log line), at once. The services refuse a bad setting
//! with exit 2 and a message naming it, and count a variable set to the empty string as unset.
//!
//! Runs the built binaries (`cargo build --bins`, as `make test` does); no Kafka, no Postgres.
//! The services get unreachable brokers and shards and a listen address that is taken, so a
//! binary that started in spite of the flag could not pass for one that answered it.

use std::process::Output;
use std::time::{Duration, Instant};

use chat_e2e::binary;

const BINARIES: &[&str] = &[
    "gateway",
    "multiplexer",
    "db-writer",
    "chatctl",
    "chat",
    "loadgen",
    "chaos",
];

/// Runs `name args` with `env` added, and gives it `bound` to finish.
fn run(name: &str, args: &[&str], env: &[(&str, &str)], bound: Duration) -> Output {
    let path = binary(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --bins)",
        path.display()
    );
    let mut child = std::process::Command::new(&path)
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    let started = Instant::now();
    loop {
        match child.try_wait().expect("waiting for the child") {
            Some(_) => break,
            None if started.elapsed() > bound => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("the killed child's output");
                panic!(
                    "{name} {args:?} still ran after {bound:?}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    child.wait_with_output().expect("the child's output")
}

/// Settings under which a service that did start would fail or hang, never exit 0: brokers and
/// shards that do not answer, and listen addresses that are taken.
fn hostile_env(taken: &std::net::TcpListener) -> Vec<(&'static str, String)> {
    let addr = taken.local_addr().expect("an address").to_string();
    vec![
        ("KAFKA_BROKERS", "127.0.0.1:1".to_owned()),
        (
            "SHARD_DSNS",
            "postgres://nobody@127.0.0.1:1/none".to_owned(),
        ),
        ("GATEWAY_ADDR", addr.clone()),
        ("MULTIPLEXER_HTTP_ADDR", addr),
        ("RUST_LOG", "trace".to_owned()),
    ]
}

#[test]
fn every_binary_answers_help_and_version_and_does_nothing_else() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let env = hostile_env(&taken);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for name in BINARIES {
        for flag in ["--help", "--version"] {
            let out = run(name, &[flag], &env, Duration::from_secs(10));
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "{name} {flag}: {:?}; stderr: {stderr}",
                out.status
            );
            assert!(stderr.is_empty(), "{name} {flag} wrote to stderr: {stderr}");
            if flag == "--version" {
                assert_eq!(
                    stdout.trim(),
                    format!("{name} {}", env!("CARGO_PKG_VERSION")),
                    "{name} --version"
                );
            } else {
                assert!(
                    stdout.contains(&format!("Usage: {name}")),
                    "{name} --help: {stdout}"
                );
            }
        }
    }
}

#[test]
fn the_services_help_lists_each_setting_with_its_variable_and_default() {
    let out = run("gateway", &["--help"], &[], Duration::from_secs(10));
    let help = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "--gateway-id <ID>",
        "[env: GATEWAY_ID=",
        "[default: gw1]",
        "--kafka-brokers",
        "[env: KAFKA_BROKERS=",
        "[default: 127.0.0.1:9092]",
        "--http-request-timeout-secs",
        "[env: HTTP_REQUEST_TIMEOUT_SECS=",
        "RUST_LOG",
    ] {
        assert!(
            help.contains(expected),
            "gateway --help lacks {expected:?}:\n{help}"
        );
    }
    // The secret's default stays out of the help, and so does its value when it is set.
    let out = run(
        "gateway",
        &["--help"],
        &[("JWT_SECRET", "s3cr3t-from-env")],
        Duration::from_secs(10),
    );
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("[env: JWT_SECRET]"), "{help}");
    assert!(!help.contains("s3cr3t-from-env"), "{help}");
    assert!(
        !help.contains(chat_common::config::DEV_JWT_SECRET),
        "{help}"
    );

    let out = run("multiplexer", &["--help"], &[], Duration::from_secs(10));
    let help = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "--multiplexer-max-batch",
        "[env: MULTIPLEXER_MAX_BATCH=",
        "[default: 5000]",
    ] {
        assert!(
            help.contains(expected),
            "multiplexer --help lacks {expected:?}:\n{help}"
        );
    }
    // The multiplexer's linger is 0 by default.
    let linger = help
        .lines()
        .skip_while(|l| !l.contains("--kafka-linger-ms"))
        .take(2)
        .collect::<String>();
    assert!(linger.contains("[default: 0]"), "{linger}");
}

#[test]
fn a_bad_setting_stops_a_service_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let env = hostile_env(&taken);
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cases: &[(&str, &str, &str, &str)] = &[
        ("gateway", "MAX_BODY_BYTES", "lots", "--max-body-bytes"),
        (
            "gateway",
            "HTTP_IDLE_TIMEOUT_SECS",
            "0",
            "--http-idle-timeout-secs",
        ),
        ("gateway", "DEV_TOKENS", "yes", "--dev-tokens"),
        (
            "gateway",
            "KAFKA_PRODUCER_OPTS",
            "linger.ms",
            "--kafka-producer-opts",
        ),
        ("multiplexer", "RETENTION", "forever", "--retention"),
        (
            "multiplexer",
            "MULTIPLEXER_OUTBOUND_BATCH",
            "1",
            "--multiplexer-outbound-batch",
        ),
    ];
    for (name, var, value, flag) in cases {
        env.push((var, value));
        let out = run(name, &[], &env, Duration::from_secs(10));
        env.pop();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name} with {var}={value}: {stderr}"
        );
        assert!(
            stderr.contains(flag) && stderr.contains(var),
            "{name} with {var}={value} does not name {flag} and {var}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // The same value given as a flag names the flag.
    let out = run(
        "gateway",
        &["--max-body-bytes", "lots"],
        &env,
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--max-body-bytes") && !stderr.contains("MAX_BODY_BYTES"),
        "{stderr}"
    );
    // A value that parses but cannot be used stops start-up too, naming the variable.
    for name in ["gateway", "multiplexer"] {
        env.push(("SHARD_DSNS", " , "));
        let out = run(name, &[], &env, Duration::from_secs(10));
        env.pop();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: {stderr}");
        assert!(stderr.contains("SHARD_DSNS"), "{name}: {stderr}");
    }
}

#[test]
fn a_variable_set_to_the_empty_string_counts_as_unset() {
    // Were the empty MAX_BODY_BYTES parsed, it would be refused before the later, bad timeout.
    let out = run(
        "gateway",
        &[],
        &[("MAX_BODY_BYTES", ""), ("HTTP_REQUEST_TIMEOUT_SECS", "0")],
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("HTTP_REQUEST_TIMEOUT_SECS"), "{stderr}");
    assert!(!stderr.contains("MAX_BODY_BYTES"), "{stderr}");
}
