# SHARD_DSNS holds the shard passwords, so it reaches the tasks as a secret, not as plain
# environment. The list is in shard index order (see rds.tf).

# Every DSN asks for TLS with the server's certificate and name checked against the RDS CA
# bundle, which the images must carry at rds_ca_bundle_path.
locals {
  shard_dsns = join(",", [
    for i, db in aws_db_instance.shard :
    "postgres://${db.username}:${random_password.shard[i].result}@${db.address}:${db.port}/${db.db_name}?sslmode=verify-full&sslrootcert=${var.rds_ca_bundle_path}"
  ])
}

resource "aws_secretsmanager_secret" "shard_dsns" {
  name_prefix = "${var.name}/shard-dsns-"
  description = "SHARD_DSNS of the chat processes: comma-separated shard DSNs, in shard order"
}

resource "aws_secretsmanager_secret_version" "shard_dsns" {
  secret_id     = aws_secretsmanager_secret.shard_dsns.id
  secret_string = local.shard_dsns
}
