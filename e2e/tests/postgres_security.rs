//! The shards behind TLS and least privilege (`infra/scripts/postgres.sh start --secure`,
//! started here when it is not running): a plaintext connection, a wrong password and an
//! unknown CA are refused; over `sslmode=verify-full` the owner migrates, the writer stores,
//! the reader reads and cannot write; and the pipeline runs with the multiplexer as the writer
//! and the gateway as the reader.

use anyhow::Context;
use chat_common::ids::{ConversationKey, UserId};
use chat_e2e::{connect, http_url, new_message, ws_url, TestEnv, WAIT};
use db_writer::{ShardConfig, Shards};
use std::path::{Path, PathBuf};

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

/// A DSN for `role` on database `db` of the secured server, with libpq's TLS settings.
fn dsn(role: &str, db: &str, tls: &str) -> anyhow::Result<String> {
    Ok(format!(
        "postgres://{role}:{}@127.0.0.1:{PORT}/{db}?{tls}",
        password(role)?
    ))
}

fn verify_full() -> String {
    format!(
        "sslmode=verify-full&sslrootcert={}",
        state().join("pg-secure-tls/ca.crt").display()
    )
}

fn shards(dsn: &str) -> anyhow::Result<Shards> {
    Ok(Shards::connect(&ShardConfig::from_list(dsn, 2)?)?)
}

/// Whether a connection through the shard layer gets an answer (what it asks does not need a
/// migrated database), and the error with its causes when not.
async fn answers(dsn: &str) -> Result<(), String> {
    let s = shards(dsn).map_err(|e| format!("{e:?}"))?;
    s.missing_migrations()
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?} {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_take_only_tls_and_each_role_only_its_part() -> anyhow::Result<()> {
    tokio::task::spawn_blocking(|| script(&["start", "--secure"])).await??;
    let db = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);

    // Refused: plaintext, a wrong password, a certificate from a CA the client does not know.
    let err = answers(&dsn("chat_writer", "chat_shard_0", "sslmode=disable")?)
        .await
        .expect_err("plaintext got in");
    assert!(err.contains("no encryption"), "{err}");
    let wrong = format!(
        "postgres://chat_writer:nope@127.0.0.1:{PORT}/chat_shard_0?{}",
        verify_full()
    );
    let err = answers(&wrong).await.expect_err("a wrong password got in");
    assert!(err.contains("password authentication failed"), "{err}");
    let err = answers(&dsn("chat_writer", "chat_shard_0", "sslmode=verify-full")?)
        .await
        .expect_err("an unknown CA was trusted");
    assert!(err.contains("certificate verify failed"), "{err}");

    // The owner makes a shard database of this test's, grants the others their part (as
    // postgres.sh does for chat_shard_N) and migrates it.
    let (owner, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={PORT} user=chat_owner password={} dbname=postgres sslmode=require", password("chat_owner")?),
        postgres_tls()?,
    )
    .await?;
    tokio::spawn(conn);
    owner
        .batch_execute(&format!("CREATE DATABASE \"{db}\""))
        .await?;
    let result = async {
        let grants = tokio::task::spawn_blocking(|| script(&["grants-sql", "--secure"])).await??;
        let (in_db, conn) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={PORT} user=chat_owner password={} dbname={db} sslmode=require", password("chat_owner")?),
            postgres_tls()?,
        )
        .await?;
        tokio::spawn(conn);
        in_db.batch_execute(&grants).await?;
        shards(&dsn("chat_owner", &db, &verify_full())?)?.migrate().await?;

        // The writer stores; the reader reads it and may not write.
        let writer = shards(&dsn("chat_writer", &db, &verify_full())?)?;
        let stored = writer.store_batch(&[new_message("alice", "bob", "as the writer", 1)?]).await?;
        assert_eq!(stored.len(), 1);
        let reader = shards(&dsn("chat_reader", &db, &verify_full())?)?;
        let ab = ConversationKey::of(&UserId::parse("alice")?, &UserId::parse("bob")?)
            .context("two users")?;
        let page = reader.history(&ab, None, 10).await?;
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].body, "as the writer");
        let err = reader
            .store_batch(&[new_message("alice", "bob", "as the reader", 1)?])
            .await
            .expect_err("the reader wrote");
        assert!(format!("{err:?}").contains("permission denied"), "{err:?}");
        assert!(reader.migrate().await.is_err(), "the reader migrated");

        // The pipeline: the multiplexer as the writer (not migrating), the gateway as the reader.
        let env = TestEnv::new(1, &["gw1"]).await?;
        let writer_dsns = dsn("chat_writer", &db, &verify_full())?;
        let mux = env
            .start_multiplexer_with(move |c| {
                c.shards = ShardConfig::from_list(&writer_dsns, 2).expect("a DSN");
                c.migrate = false;
            })
            .await?;
        let reader_dsns = dsn("chat_reader", &db, &verify_full())?;
        let gw = env
            .start_gateway_with("gw1", move |c| {
                c.shards = ShardConfig::from_list(&reader_dsns, 2)
                    .expect("a DSN")
                    .with_plans(db_writer::Plans::Auto);
            })
            .await?;
        // bob connects (the gateway reads his index as the reader) and gets alice's message.
        let mut bob = connect(&ws_url(gw.addr), &env.token("bob")).await;
        let alice = connect(&ws_url(gw.addr), &env.token("alice")).await;
        alice.send("bob", "through TLS shards").await?;
        let got = bob.next_message(WAIT).await?;
        assert_eq!(got.body, "through TLS shards");
        let rest = chat_client::Rest::new(&http_url(gw.addr));
        let history = rest
            .request("GET", "/messages/alice", Some(&env.token("bob")), None)
            .await?;
        assert_eq!(history.status, 200, "{:?}", history.body);
        assert!(history.body.to_string().contains("through TLS shards"));
        alice.close();
        bob.close();
        gw.stop().await;
        mux.stop().await;
        env.teardown().await
    }
    .await;
    // The pools of the roles that used it close as they are dropped; the owner may not end
    // other roles' sessions (FORCE), so it waits for them.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match owner
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\""))
            .await
        {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing_wait(&e);
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => return result.and(Err(e.into())),
        }
    }
    result
}

/// Dropping waits only for sessions still open.
fn tracing_wait(e: &tokio_postgres::Error) {
    assert!(
        format!("{e:?}").contains("is being accessed by other users"),
        "dropping the test database: {e:?}"
    );
}

/// A connector for the test's own admin connections (the CA of the secured server).
fn postgres_tls() -> anyhow::Result<postgres_openssl::MakeTlsConnector> {
    let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client())?;
    b.set_ca_file(state().join("pg-secure-tls/ca.crt"))?;
    Ok(postgres_openssl::MakeTlsConnector::new(b.build()))
}
