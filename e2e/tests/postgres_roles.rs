//! `db-writer roles` against the secured local Postgres (`infra/scripts/postgres.sh start
//! --secure`, started here when it is not running), as the Terraform deployment runs it: an
//! administrator that is not a superuser (like the RDS master user) created the shard databases
//! and migrated them itself, as every process did before the roles existed. Then:
//!
//! - `db-writer roles`, run twice, leaves the owner owning the databases and every table, prints
//!   no password, and runs the same grants as `postgres.sh grants-sql`;
//! - the owner migrates what is missing, the writer stores (in tables of migrations before and
//!   after the roles), the reader reads and may not write;
//! - a delete-on-ack multiplexer running as the writer cannot build the expiry sweep's index: it
//!   says so, keeps running, and expires unacked messages once the owner has migrated in
//!   delete-on-ack mode (`db-writer migrate --retention delete-on-ack`).
//!
//! The roles are the server's own (chat_owner, chat_writer, chat_reader): the test sets the
//! passwords postgres.sh gave them, so other tests using them are not disturbed. This file holds
//! one test, so that nothing else in its binary alters the roles at the same time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use chat_common::ids::{ConversationKey, UserId};
use chat_e2e::{eventually, http_url, new_message, run_binary, TestEnv};
use db_writer::{Retention, ShardConfig, Shards, SweepIndexError};

const PORT: u16 = 54321;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn state() -> PathBuf {
    std::env::var_os("CHAT_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".local"))
}

fn script(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(root().join("infra/scripts/postgres.sh"))
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "postgres.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn password(role: &str) -> anyhow::Result<String> {
    Ok(
        std::fs::read_to_string(state().join("pg-secure-users").join(role))?
            .trim()
            .to_owned(),
    )
}

/// The secured server's unix socket directory (its instance dir, see postgres.sh): the only way
/// in for a role other than the three, which TCP refuses.
fn socket_dir() -> anyhow::Result<PathBuf> {
    let primary = state().join("pg-secure");
    if primary.join("data/PG_VERSION").exists() {
        return Ok(primary);
    }
    let recorded = std::fs::read_to_string(state().join("pg-secure.location"))
        .context("the secured Postgres's instance dir")?;
    Ok(PathBuf::from(recorded.trim()))
}

/// A DSN for `user` on `db` through the unix socket (trust: administration only).
fn socket_dsn(user: &str, db: &str) -> anyhow::Result<String> {
    Ok(format!(
        "host={} port={PORT} user={user} dbname={db} sslmode=disable",
        socket_dir()?.display()
    ))
}

/// A DSN for one of the three roles on `db` over TCP, TLS with the name checked.
fn tls_dsn(role: &str, db: &str) -> anyhow::Result<String> {
    Ok(format!(
        "postgres://{role}:{}@127.0.0.1:{PORT}/{db}?sslmode=verify-full&sslrootcert={}",
        password(role)?,
        state().join("pg-secure-tls/ca.crt").display()
    ))
}

fn dsns(f: impl Fn(&str) -> anyhow::Result<String>, dbs: &[String]) -> anyhow::Result<String> {
    Ok(dbs
        .iter()
        .map(|d| f(d))
        .collect::<Result<Vec<_>, _>>()?
        .join(","))
}

async fn admin(user: &str, db: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(&socket_dsn(user, db)?, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting as {user} to {db} through the socket"))?;
    tokio::spawn(conn);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_made_by_the_administrator_and_each_process_runs_as_its_own() -> anyhow::Result<()>
{
    tokio::task::spawn_blocking(|| script(&["start", "--secure"])).await??;
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let master = format!("m{id}");
    let dbs: Vec<String> = (0..2).map(|i| format!("r{id}_{i}")).collect();

    // The administrator, as RDS makes its master user: no superuser, CREATEROLE and CREATEDB,
    // owning the shard databases. It holds the three roles with ADMIN OPTION, as the role that
    // created them does (postgres.sh created them here, before this test).
    let postgres = admin("postgres", "postgres").await?;
    postgres
        .batch_execute(&format!(
            "CREATE ROLE \"{master}\" LOGIN NOSUPERUSER CREATEROLE CREATEDB;
             GRANT chat_owner, chat_writer, chat_reader TO \"{master}\" WITH ADMIN OPTION;"
        ))
        .await?;
    for db in &dbs {
        postgres
            .batch_execute(&format!("CREATE DATABASE \"{db}\" OWNER \"{master}\""))
            .await?;
    }
    let result = check(&master, &dbs).await;
    for db in &dbs {
        postgres
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .await?;
    }
    postgres
        .batch_execute(&format!(
            "DROP OWNED BY \"{master}\"; DROP ROLE \"{master}\";"
        ))
        .await?;
    result
}

async fn check(master: &str, dbs: &[String]) -> anyhow::Result<()> {
    // Before the roles: the administrator migrated, up to the user index (6 and 7 come later,
    // as the owner's, to show that the default privileges reach what the owner creates).
    let master_dsns = dsns(|d| socket_dsn(master, d), dbs)?;
    Shards::connect(&ShardConfig::from_list(&master_dsns, 1)?)?
        .migrate_to(5)
        .await?;

    // The roles, twice: the second run changes nothing but the passwords' salts.
    let passwords = [
        ("CHAT_OWNER_PASSWORD", password("chat_owner")?),
        ("CHAT_WRITER_PASSWORD", password("chat_writer")?),
        ("CHAT_READER_PASSWORD", password("chat_reader")?),
    ];
    let mut env: Vec<(&str, String)> = passwords.to_vec();
    env.push(("SHARD_DSNS", master_dsns.clone()));
    env.push(("RUST_LOG", "info".into()));
    let mut summaries = Vec::new();
    for run in 1..=2 {
        let (code, out, err) = run_binary("db-writer", &["roles"], &env).await?;
        let out = String::from_utf8_lossy(&out).into_owned();
        assert_eq!(code, 0, "db-writer roles, run {run}: {out}\n{err}");
        for (_, p) in &passwords {
            assert!(
                !out.contains(p.as_str()) && !err.contains(p.as_str()),
                "run {run} printed a password"
            );
        }
        summaries.push(out);
    }
    // The roles exist already (postgres.sh made them): set again; the databases and the
    // tables of migrations 1 to 5 (and the migrations' own table) handed over once.
    assert!(
        summaries[0].contains("0 created, 6 passwords set, 2 databases and"),
        "{}",
        summaries[0]
    );
    assert!(
        summaries[1].contains("0 created, 6 passwords set, 0 databases and 0 tables"),
        "{}",
        summaries[1]
    );
    let (code, _, err) =
        run_binary("db-writer", &["roles"], &[("SHARD_DSNS", master_dsns)]).await?;
    assert_ne!(code, 0, "ran without passwords");
    assert!(err.contains("CHAT_OWNER_PASSWORD is not set"), "{err}");
    // The same grants as the local secured server's.
    let grants = tokio::task::spawn_blocking(|| script(&["grants-sql", "--secure"])).await??;
    assert_eq!(grants, db_writer::roles::GRANTS_SQL);

    for db in dbs {
        let c = admin("postgres", db).await?;
        let owner: String = c
            .query_one(
                "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = current_database()",
                &[],
            )
            .await?
            .get(0);
        assert_eq!(owner, "chat_owner", "{db}");
        let others: Vec<String> = c
            .query(
                "SELECT c.relname || ' ' || pg_get_userbyid(c.relowner)
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'S', 'i')
                   AND pg_get_userbyid(c.relowner) <> 'chat_owner'",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(others.is_empty(), "{db}: not the owner's: {others:?}");
    }

    // The owner migrates the rest (keep mode: no sweep index).
    let owner_dsns = dsns(|d| tls_dsn("chat_owner", d), dbs)?;
    let (code, out, err) = run_binary(
        "db-writer",
        &["migrate"],
        &[("SHARD_DSNS", owner_dsns.clone())],
    )
    .await?;
    assert_eq!(code, 0, "db-writer migrate as the owner: {err}");
    assert!(String::from_utf8_lossy(&out).contains("2 shards migrated"));

    // The writer stores (messages of 0001, the user index of 0006); the reader reads and may
    // not write.
    let writer_dsns = dsns(|d| tls_dsn("chat_writer", d), dbs)?;
    let writer = Shards::connect(&ShardConfig::from_list(&writer_dsns, 2)?)?;
    assert!(writer.missing_migrations().await?.is_empty());
    let old = new_message("alice", "bob", "never acked", 1)?;
    assert_eq!(
        writer.store_batch(std::slice::from_ref(&old)).await?.len(),
        1
    );
    let reader = Shards::connect(&ShardConfig::from_list(
        &dsns(|d| tls_dsn("chat_reader", d), dbs)?,
        2,
    )?)?;
    let ab = ConversationKey::of(&UserId::parse("alice")?, &UserId::parse("bob")?)
        .context("two users")?;
    let page = reader.history(&ab, None, 10).await?;
    assert_eq!(page.len(), 1);
    let err = reader
        .store_batch(&[new_message("alice", "bob", "as the reader", 2)?])
        .await
        .expect_err("the reader wrote");
    assert!(format!("{err:?}").contains("permission denied"), "{err:?}");

    // Delete-on-ack, the shards migrated in keep mode: the writer may not build the index.
    match writer.ensure_sweep_index().await {
        Err(SweepIndexError::NotOwner { .. }) => {}
        other => panic!("the writer's build of the sweep index: {other:?}"),
    }

    // A delete-on-ack multiplexer as the writer, not migrating: it runs, counts the refused
    // build, and expires nothing yet.
    let env = TestEnv::new(1, &["gw1"]).await?;
    let mux_dsns = writer_dsns.clone();
    let mux = env
        .start_multiplexer_with(move |c| {
            c.shards = ShardConfig::from_list(&mux_dsns, 2).expect("DSNs");
            c.migrate = false;
            c.retention = Retention::DeleteOnAck;
            c.unacked_ttl = Duration::from_secs(1);
            c.expiry_interval = Duration::from_millis(200);
        })
        .await?;
    let metrics = chat_client::Rest::new(&http_url(mux.addr));
    eventually("the refused build counted", || async {
        let scrape = metrics.request("GET", "/metrics", None, None).await?;
        let text = scrape.body.as_str().unwrap_or_default().to_owned();
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix("multiplexer_errors_total{kind=\"sweep_index\"} "))
            .filter_map(|v| v.parse::<f64>().ok())
            .any(|v| v > 0.0)
            .then_some(()))
    })
    .await?;
    let expired = || async {
        let mut n = 0;
        for db in dbs {
            let c = admin("postgres", db).await?;
            let row = c
                .query_one(
                    "SELECT count(*) FROM messages WHERE expired_at_ms IS NOT NULL AND body IS NULL",
                    &[],
                )
                .await?;
            n += row.get::<_, i64>(0);
        }
        anyhow::Ok(n)
    };
    assert_eq!(expired().await?, 0, "expired without the index");

    // The owner migrates in delete-on-ack mode: the index is built, and the multiplexer's
    // next sweep, as the writer, expires the unacked message.
    let (code, out, err) = run_binary(
        "db-writer",
        &["migrate", "--retention", "delete-on-ack"],
        &[("SHARD_DSNS", owner_dsns)],
    )
    .await?;
    assert_eq!(
        code, 0,
        "db-writer migrate --retention delete-on-ack: {err}"
    );
    assert!(String::from_utf8_lossy(&out).contains("the expiry sweep's index is ready"));
    writer.ensure_sweep_index().await?;
    eventually(
        "the unacked message expired by the writer's sweep",
        || async { Ok((expired().await? == 1).then_some(())) },
    )
    .await?;
    mux.stop().await;
    env.teardown().await
}
