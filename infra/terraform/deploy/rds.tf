# Postgres shards: one RDS instance per shard, private, reachable from the application only.
#
# Order matters: SHARD_DSNS lists the shards by index (secrets.tf) and the locator is a jump
# hash over that order. Add shards only at the end; never remove or reorder one.

resource "aws_db_subnet_group" "shards" {
  name       = "${var.name}-shards"
  subnet_ids = aws_subnet.private[*].id
}

resource "aws_db_parameter_group" "shards" {
  name_prefix = "${var.name}-shards-"
  family      = "postgres${var.postgres_version}"

  # TLS only: the processes connect with sslmode=verify-full against the RDS CA bundle
  # (secrets.tf), and an unencrypted connection is refused.
  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }

  # gp3 storage and a working set in memory: a random page read costs about a sequential one.
  # With the default (4) the planner scans whole tables instead of probing an index.
  parameter {
    name  = "random_page_cost"
    value = "1.1"
  }

  # Group commit, as the local stack's Postgres (infra/scripts/postgres.sh): a commit waits up to
  # 0.5 ms for others to share its WAL flush when another transaction is active.
  parameter {
    name  = "commit_delay"
    value = "500"
  }
  parameter {
    name  = "commit_siblings"
    value = "1"
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "random_password" "shard" {
  count = var.shard_count

  length  = 40
  special = false
}

resource "aws_db_instance" "shard" {
  count = var.shard_count

  identifier     = "${var.name}-shard-${count.index}"
  engine         = "postgres"
  engine_version = var.postgres_version
  instance_class = var.db_instance_class

  db_name  = "chat"
  username = "chat"
  password = random_password.shard[count.index].result
  port     = 5432

  allocated_storage     = var.db_allocated_storage_gb
  max_allocated_storage = var.db_max_allocated_storage_gb
  storage_type          = "gp3"
  storage_encrypted     = true

  multi_az               = var.db_multi_az
  db_subnet_group_name   = aws_db_subnet_group.shards.name
  vpc_security_group_ids = [aws_security_group.db.id]
  publicly_accessible    = false
  parameter_group_name   = aws_db_parameter_group.shards.name

  backup_retention_period    = var.db_backup_retention_days
  deletion_protection        = var.db_deletion_protection
  skip_final_snapshot        = false
  final_snapshot_identifier  = "${var.name}-shard-${count.index}-final"
  copy_tags_to_snapshot      = true
  auto_minor_version_upgrade = true
  apply_immediately          = false

  performance_insights_enabled = true

  tags = { Name = "${var.name}-shard-${count.index}", shard = tostring(count.index) }
}
