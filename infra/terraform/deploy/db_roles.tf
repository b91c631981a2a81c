# The shards' Postgres roles (docs/security.md, "Services to Postgres"), so that each process
# holds only what it needs: chat_owner owns the shard databases and their tables (the migration
# task signs in as it), chat_writer reads and writes rows (the multiplexers), chat_reader reads
# (the gateways). The RDS master user (rds.tf) serves only the roles task below.
#
# Each role's password is generated here and kept in Secrets Manager as {username, password},
# encrypted with a key of its own; the role's SHARD_DSNS, the one its tasks get, is another
# secret under the same key (secrets.tf).
#
# RDS is private, so no Terraform provider can reach it: the roles are made by a one-off ECS
# task, `db-writer roles`, run like the migrations (migrate.tf) and before them, signed in as
# the master user. It creates the roles or sets their passwords, makes chat_owner the owner of
# each shard database and of the tables an earlier version created as the master user, and
# runs the owner's grants (what `infra/scripts/postgres.sh grants-sql` prints) in each shard
# database. Running it again changes nothing; it runs whenever a password, the shards or the
# image change.
#
# Rotation: `terraform apply -replace='random_password.db_role["chat_writer"]'`. The apply
# writes the new secrets, runs the roles task (Postgres takes the new password: sessions open
# keep working, new ones need it) and redeploys the services that sign in as that role (their
# ecs.tf triggers), whose new tasks read the new secret. Between the two, a task of the old
# deployment that opens a connection is refused: rotate when a few seconds of retried writes or
# refused reads are acceptable. infra/terraform/README.md, "Secrets and their rotation".

locals {
  db_roles = toset(["chat_owner", "chat_writer", "chat_reader"])
}

resource "aws_kms_key" "db_roles" {
  description         = "Encrypts the Postgres roles' secrets of ${var.name}"
  enable_key_rotation = true
}

resource "random_password" "db_role" {
  for_each = local.db_roles

  length  = 40
  special = false
}

resource "aws_secretsmanager_secret" "db_role" {
  for_each = local.db_roles

  name_prefix = "${var.name}/db-role-${each.key}-"
  description = "Password of the Postgres role ${each.key} on every shard: {username, password}"
  kms_key_id  = aws_kms_key.db_roles.key_id
}

resource "aws_secretsmanager_secret_version" "db_role" {
  for_each = local.db_roles

  secret_id = aws_secretsmanager_secret.db_role[each.key].id
  secret_string = jsonencode({
    username = each.key
    password = random_password.db_role[each.key].result
  })
}

resource "aws_cloudwatch_log_group" "db_roles" {
  name              = "/${var.name}/db-roles"
  retention_in_days = var.log_retention_days
}

resource "aws_ecs_task_definition" "db_roles" {
  family                   = "${var.name}-db-roles"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = 256
  memory                   = 512
  execution_role_arn       = aws_iam_role.task_execution.arn

  container_definitions = jsonencode([{
    name      = "db-roles"
    image     = local.db_writer_image
    essential = true
    command   = var.db_roles_command
    environment = [
      { name = "LOG_FORMAT", value = "json" },
      { name = "RUST_LOG", value = var.rust_log },
    ]
    secrets = [
      # The master user's DSNs, and the passwords to give the roles.
      { name = "SHARD_DSNS", valueFrom = aws_secretsmanager_secret.master_dsns.arn },
      { name = "CHAT_OWNER_PASSWORD", valueFrom = "${aws_secretsmanager_secret.db_role["chat_owner"].arn}:password::" },
      { name = "CHAT_WRITER_PASSWORD", valueFrom = "${aws_secretsmanager_secret.db_role["chat_writer"].arn}:password::" },
      { name = "CHAT_READER_PASSWORD", valueFrom = "${aws_secretsmanager_secret.db_role["chat_reader"].arn}:password::" },
    ]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        "awslogs-group"         = aws_cloudwatch_log_group.db_roles.name
        "awslogs-region"        = var.aws_region
        "awslogs-stream-prefix" = "db-roles"
      }
    }
  }])
}

resource "terraform_data" "db_roles" {
  count = var.run_migrations ? 1 : 0

  # Again when a password changes (rotation), a shard is added, or the task (its image).
  triggers_replace = [
    aws_ecs_task_definition.db_roles.arn,
    [for role in local.db_roles : aws_secretsmanager_secret_version.db_role[role].version_id],
    aws_db_instance.shard[*].id,
  ]

  provisioner "local-exec" {
    interpreter = ["bash", "-c"]
    command     = local.run_one_off_task
    environment = {
      WHAT            = "db-roles"
      REGION          = var.aws_region
      CLUSTER         = aws_ecs_cluster.this.name
      TASK_DEFINITION = aws_ecs_task_definition.db_roles.arn
      SUBNETS         = join(",", aws_subnet.private[*].id)
      SECURITY_GROUP  = aws_security_group.multiplexer.id
      LOG_GROUP       = aws_cloudwatch_log_group.db_roles.name
    }
  }

  # The shards must accept the master user (RDS up, the secrets written) before the task runs.
  depends_on = [
    aws_db_instance.shard,
    aws_secretsmanager_secret_version.master_dsns,
    aws_secretsmanager_secret_version.db_role,
  ]
}
