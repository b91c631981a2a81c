# Shard schema migrations as a one-off task, run before any service is updated.
#
# An apply that changes an image first runs the roles task (db_roles.tf), then `db-writer
# migrate` once, as an ECS task with the multiplexer's network access, signed in to the shards
# as their owner (chat_owner), waits for it to stop and fails the apply if it did not exit 0.
# Only then are the gateway and multiplexer services updated (they depend on it). The
# multiplexers are told not to migrate themselves (MULTIPLEXER_MIGRATE=false), and as
# chat_writer they could not: during a rolling update old and new tasks run side by side, and a
# migration applied by the first new task would run under the old ones. A migration that the
# release notes mark as breaking (the old version cannot run against it; docs/operations.md,
# "Migrations") needs the old tasks stopped first: see infra/terraform/README.md, "Upgrades and
# migrations".
#
# The task gets the deployment's RETENTION: in delete-on-ack mode it also builds the expiry
# sweep's index, which the multiplexers, as chat_writer, may not build (only the owner of the
# tables may). Switching retention to delete-on-ack changes the task, so it runs again first.
#
# Running the tasks needs the aws CLI on the machine running terraform (the same credentials).
# With run_migrations = false nothing is run: run db-writer roles and db-writer migrate
# yourself before the apply that brings the new images.

locals {
  db_writer_image = var.db_writer_image != "" ? var.db_writer_image : var.multiplexer_image

  # Runs TASK_DEFINITION once in the private subnets, waits for it to stop, and fails (the apply
  # with it) unless it exited 0. For the one-off tasks: the roles and the migrations.
  run_one_off_task = <<-EOT
    set -euo pipefail
    task=$(aws ecs run-task --region "$REGION" --cluster "$CLUSTER" \
      --task-definition "$TASK_DEFINITION" --launch-type FARGATE --count 1 \
      --network-configuration "awsvpcConfiguration={subnets=[$SUBNETS],securityGroups=[$SECURITY_GROUP],assignPublicIp=DISABLED}" \
      --query 'tasks[0].taskArn' --output text)
    [ -n "$task" ] && [ "$task" != "None" ] || { echo "$WHAT: the task did not start" >&2; exit 1; }
    echo "$WHAT: $task started; waiting for it to stop"
    aws ecs wait tasks-stopped --region "$REGION" --cluster "$CLUSTER" --tasks "$task"
    code=$(aws ecs describe-tasks --region "$REGION" --cluster "$CLUSTER" --tasks "$task" \
      --query 'tasks[0].containers[0].exitCode' --output text)
    if [ "$code" != "0" ]; then
      echo "$WHAT: the task exited with $code; services not updated (logs: $LOG_GROUP)" >&2
      exit 1
    fi
    echo "$WHAT: done"
  EOT
}

resource "aws_cloudwatch_log_group" "migrate" {
  name              = "/${var.name}/migrate"
  retention_in_days = var.log_retention_days
}

resource "aws_ecs_task_definition" "migrate" {
  family                   = "${var.name}-migrate"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = 256
  memory                   = 512
  execution_role_arn       = aws_iam_role.task_execution.arn

  container_definitions = jsonencode([{
    name      = "migrate"
    image     = local.db_writer_image
    essential = true
    command   = var.migrate_command
    environment = concat(local.common_environment, [
      # delete-on-ack: the migration also builds the expiry sweep's index.
      { name = "RETENTION", value = var.retention },
    ])
    # As the owner of the shard databases: the migrations create and alter tables.
    secrets = [{ name = "SHARD_DSNS", valueFrom = aws_secretsmanager_secret.role_dsns["chat_owner"].arn }]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        "awslogs-group"         = aws_cloudwatch_log_group.migrate.name
        "awslogs-region"        = var.aws_region
        "awslogs-stream-prefix" = "migrate"
      }
    }
  }])
}

resource "terraform_data" "migrate" {
  count = var.run_migrations ? 1 : 0

  # Again whenever what runs could bring a new schema: the migration task (its image, its
  # retention mode) or either image.
  triggers_replace = [
    aws_ecs_task_definition.migrate.arn,
    var.gateway_image,
    var.multiplexer_image,
  ]

  provisioner "local-exec" {
    interpreter = ["bash", "-c"]
    command     = local.run_one_off_task
    environment = {
      WHAT            = "migrate"
      REGION          = var.aws_region
      CLUSTER         = aws_ecs_cluster.this.name
      TASK_DEFINITION = aws_ecs_task_definition.migrate.arn
      SUBNETS         = join(",", aws_subnet.private[*].id)
      SECURITY_GROUP  = aws_security_group.multiplexer.id
      LOG_GROUP       = aws_cloudwatch_log_group.migrate.name
    }
  }

  # The shards must accept connections as the owner (RDS up, the roles made, the secret
  # written) before the task runs.
  depends_on = [
    aws_db_instance.shard,
    terraform_data.db_roles,
    aws_secretsmanager_secret_version.role_dsns,
  ]
}
