# SHARD_DSNS holds the shard passwords, so it reaches the tasks as a secret, not as plain
# environment. Each list is in shard index order (see rds.tf), one DSN per shard.
#
# Every process signs in as its own Postgres role (db_roles.tf): the migration task as
# chat_owner, the multiplexers as chat_writer, the gateways as chat_reader, each from a secret
# of its own. The RDS master user's DSNs serve only the roles task, which creates those roles.

# Every DSN asks for TLS with the server's certificate and name checked against the RDS CA
# bundle, which the images must carry at rds_ca_bundle_path.
locals {
  dsn_tls = "sslmode=verify-full&sslrootcert=${var.rds_ca_bundle_path}"

  master_dsns = join(",", [
    for i, db in aws_db_instance.shard :
    "postgres://${db.username}:${random_password.shard[i].result}@${db.address}:${db.port}/${db.db_name}?${local.dsn_tls}"
  ])

  # The same shards, signed in as each role (the passwords have no URL-special characters).
  role_dsns = {
    for role in local.db_roles : role => join(",", [
      for db in aws_db_instance.shard :
      "postgres://${role}:${random_password.db_role[role].result}@${db.address}:${db.port}/${db.db_name}?${local.dsn_tls}"
    ])
  }
}

# The master user's: for the roles task only (db_roles.tf). It was the services' SHARD_DSNS
# before the roles existed; the cloud name is kept so that the secret is not replaced.
resource "aws_secretsmanager_secret" "master_dsns" {
  name_prefix = "${var.name}/shard-dsns-"
  description = "SHARD_DSNS as the RDS master user, for the roles task only: comma-separated shard DSNs, in shard order"
}

resource "aws_secretsmanager_secret_version" "master_dsns" {
  secret_id     = aws_secretsmanager_secret.master_dsns.id
  secret_string = local.master_dsns
}

moved {
  from = aws_secretsmanager_secret.shard_dsns
  to   = aws_secretsmanager_secret.master_dsns
}

moved {
  from = aws_secretsmanager_secret_version.shard_dsns
  to   = aws_secretsmanager_secret_version.master_dsns
}

# One per role: what the tasks of that role get as SHARD_DSNS.
resource "aws_secretsmanager_secret" "role_dsns" {
  for_each = local.db_roles

  name_prefix = "${var.name}/shard-dsns-${each.key}-"
  description = "SHARD_DSNS as the Postgres role ${each.key}: comma-separated shard DSNs, in shard order"
  kms_key_id  = aws_kms_key.db_roles.key_id
}

resource "aws_secretsmanager_secret_version" "role_dsns" {
  for_each = local.db_roles

  secret_id     = aws_secretsmanager_secret.role_dsns[each.key].id
  secret_string = local.role_dsns[each.key]
}
