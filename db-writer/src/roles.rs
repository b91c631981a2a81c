//! The roles the processes sign in to the shards as, so that each holds only what it needs
//! (docs/security.md, "Services to Postgres"):
//!
//! - [`OWNER`] owns each shard database and its tables: the migrations run as it;
//! - [`WRITER`] reads and writes rows: the multiplexers;
//! - [`READER`] reads: the gateways.
//!
//! [`Shards::ensure_roles`], connected as an administrator (the RDS master user), creates them
//! or sets their passwords, hands the databases and what an earlier migration as the
//! administrator created over to the owner, and runs the owner's grants ([`GRANTS_SQL`]) in
//! each shard database. What `db-writer roles` runs; running it again changes nothing but the
//! passwords' salts.

use std::fmt;

use crate::error::DbError;
use crate::shards::Shards;

/// Owns the shard databases and their tables; `db-writer migrate` runs as it.
pub const OWNER: &str = "chat_owner";
/// Reads and writes rows: the multiplexers.
pub const WRITER: &str = "chat_writer";
/// Reads rows: the gateways.
pub const READER: &str = "chat_reader";

/// What a shard database's owner grants the writer and the reader, for what exists now and, by
/// default privileges, for every table and sequence its migrations create later. The same
/// statements as `infra/scripts/postgres.sh grants-sql` (a test compares them), which the local
/// secured Postgres and the tests run.
pub const GRANTS_SQL: &str = "\
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO chat_writer;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO chat_writer;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO chat_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE chat_owner IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO chat_writer;
ALTER DEFAULT PRIVILEGES FOR ROLE chat_owner IN SCHEMA public
  GRANT USAGE, SELECT ON SEQUENCES TO chat_writer;
ALTER DEFAULT PRIVILEGES FOR ROLE chat_owner IN SCHEMA public
  GRANT SELECT ON TABLES TO chat_reader;
";

/// The three roles' passwords. Never printed: `Debug` shows only that they are set.
pub struct RolePasswords {
    pub owner: String,
    pub writer: String,
    pub reader: String,
}

impl fmt::Debug for RolePasswords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RolePasswords { .. }")
    }
}

impl RolePasswords {
    fn by_role(&self) -> [(&'static str, &str); 3] {
        [
            (OWNER, &self.owner),
            (WRITER, &self.writer),
            (READER, &self.reader),
        ]
    }
}

/// What [`Shards::ensure_roles`] changed, summed over the shards.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RolesApplied {
    /// Roles created (a role is per Postgres server: once per server, not per database).
    pub created: usize,
    /// Roles that existed, whose password was set again.
    pub updated: usize,
    /// Shard databases handed over to the owner.
    pub databases: usize,
    /// Tables, views and sequences handed over to the owner.
    pub relations: usize,
}

impl Shards {
    /// Creates the owner, writer and reader roles with `passwords` (or sets the passwords of
    /// those that exist), makes the owner the owner of each shard database and of its tables,
    /// views and sequences, and runs [`GRANTS_SQL`] as the owner in each. Connected as an
    /// administrator: a superuser, or a role with CREATEROLE and CREATEDB that owns the
    /// databases (the RDS master user). Idempotent; each shard in one transaction.
    ///
    /// Passwords are sent as SCRAM-SHA-256 verifiers computed here, never in clear: a server
    /// that logs statements logs no password.
    pub async fn ensure_roles(&self, passwords: &RolePasswords) -> Result<RolesApplied, DbError> {
        for (role, password) in passwords.by_role() {
            if password.is_empty() {
                return Err(DbError::Config(format!("no password given for {role}")));
            }
        }
        let mut applied = RolesApplied::default();
        for shard in 0..self.len() {
            let mut client = self.client(shard).await?;
            let pg = DbError::pg(shard);
            let tx = client.transaction().await.map_err(pg)?;

            for (role, password) in passwords.by_role() {
                let exists = tx
                    .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
                    .await
                    .map_err(pg)?
                    .is_some();
                let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
                let statement = if exists { "ALTER" } else { "CREATE" };
                let sql: String = tx
                    .query_one(
                        "SELECT format('%s ROLE %I WITH LOGIN PASSWORD %L', $1::text, $2::text, $3::text)",
                        &[&statement, &role, &verifier],
                    )
                    .await
                    .map_err(pg)?
                    .get(0);
                tx.batch_execute(&sql).await.map_err(pg)?;
                if exists {
                    applied.updated += 1;
                } else {
                    tracing::info!(shard, role, "role created");
                    applied.created += 1;
                }
            }

            // Handing objects to the owner, and acting as it, needs membership in it (a
            // superuser has it implicitly). The role that created it may grant it to itself:
            // from Postgres 16 on, creating a role gives its creator only the right to grant it.
            let row = tx
                .query_one(
                    "SELECT r.rolsuper,
                            pg_has_role(current_user, $1::text,
                                CASE WHEN current_setting('server_version_num')::int >= 160000
                                     THEN 'SET' ELSE 'MEMBER' END)
                     FROM pg_roles r WHERE r.rolname = current_user",
                    &[&OWNER],
                )
                .await
                .map_err(pg)?;
            let (superuser, member): (bool, bool) = (row.get(0), row.get(1));
            if !superuser && !member {
                tx.batch_execute(&format!("GRANT {OWNER} TO CURRENT_USER"))
                    .await
                    .map_err(pg)?;
            }

            let database: Option<String> = tx
                .query_opt(
                    "SELECT format('ALTER DATABASE %I OWNER TO %I', datname, $1::text)
                     FROM pg_database
                     WHERE datname = current_database() AND pg_get_userbyid(datdba) <> $1::text",
                    &[&OWNER],
                )
                .await
                .map_err(pg)?
                .map(|r| r.get(0));
            if let Some(sql) = database {
                tx.batch_execute(&sql).await.map_err(pg)?;
                tracing::info!(shard, owner = OWNER, "database handed over");
                applied.databases += 1;
            }

            // Tables and views first: a sequence that belongs to a column follows its table
            // (and may not be handed over by itself).
            let relations: Vec<String> = tx
                .query(
                    "SELECT format('ALTER %s %I.%I OWNER TO %I',
                                   CASE c.relkind WHEN 'S' THEN 'SEQUENCE'
                                                  WHEN 'v' THEN 'VIEW'
                                                  WHEN 'm' THEN 'MATERIALIZED VIEW'
                                                  ELSE 'TABLE' END,
                                   n.nspname, c.relname, $1::text)
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = 'public'
                       AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
                       AND pg_get_userbyid(c.relowner) <> $1::text
                       AND NOT (c.relkind = 'S' AND EXISTS (
                           SELECT 1 FROM pg_depend d
                           WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                             AND d.deptype IN ('a', 'i')))
                     ORDER BY c.relkind = 'S', c.oid",
                    &[&OWNER],
                )
                .await
                .map_err(pg)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for sql in &relations {
                tx.batch_execute(sql).await.map_err(pg)?;
            }
            if !relations.is_empty() {
                tracing::info!(
                    shard,
                    relations = relations.len(),
                    owner = OWNER,
                    "tables handed over"
                );
                applied.relations += relations.len();
            }

            // The grants are the owner's: made as it, as postgres.sh grants-sql says.
            tx.batch_execute(&format!("SET LOCAL ROLE {OWNER};\n{GRANTS_SQL}"))
                .await
                .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            tracing::info!(shard, "roles and grants in place");
        }
        Ok(applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_never_shown() {
        let p = RolePasswords {
            owner: "o-secret".into(),
            writer: "w-secret".into(),
            reader: "r-secret".into(),
        };
        assert!(!format!("{p:?}").contains("secret"));
    }

    #[test]
    fn the_grants_name_the_roles() {
        for role in [OWNER, WRITER, READER] {
            assert!(GRANTS_SQL.contains(role), "{role}");
        }
    }
}
