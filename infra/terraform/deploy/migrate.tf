# Shard schema migrations as a one-off task, run before any service is updated.
#
# An apply that changes an image first runs `db-writer migrate` once, as an ECS task with the
# multiplexer's network access and the shard DSNs, waits for it to stop and fails the apply if
# it did not exit 0. Only then are the gateway and multiplexer services updated (they depend on
# it). The multiplexers are told not to migrate themselves (MULTIPLEXER_MIGRATE=false): during a
# rolling update old and new tasks run side by side, and a migration applied by the first new
# task would run under the old ones. A migration that the release notes mark as breaking (the
# old version cannot run against it; docs/operations.md, "Migrations") needs the old tasks
# stopped first: see infra/terraform/README.md, "Upgrades and migrations".
#
# Running the task needs the aws CLI on the machine running terraform (the same credentials).
# With run_migrations = false nothing is run: apply migrations yourself (db-writer migrate)
# before the apply that brings the new images.

locals {
  db_writer_image = var.db_writer_image != "" ? var.db_writer_image : var.multiplexer_image
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
    name        = "migrate"
    image       = local.db_writer_image
    essential   = true
    command     = var.migrate_command
    environment = local.common_environment
    secrets     = [local.shard_secret]
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

  # Again whenever what runs could bring a new schema: the migration task or either image.
  triggers_replace = [
    aws_ecs_task_definition.migrate.arn,
    var.gateway_image,
    var.multiplexer_image,
  ]

  provisioner "local-exec" {
    interpreter = ["bash", "-c"]
    command     = <<-EOT
      set -euo pipefail
      task=$(aws ecs run-task --region "$REGION" --cluster "$CLUSTER" \
        --task-definition "$TASK_DEFINITION" --launch-type FARGATE --count 1 \
        --network-configuration "awsvpcConfiguration={subnets=[$SUBNETS],securityGroups=[$SECURITY_GROUP],assignPublicIp=DISABLED}" \
        --query 'tasks[0].taskArn' --output text)
      [ -n "$task" ] && [ "$task" != "None" ] || { echo "migrate: the task did not start" >&2; exit 1; }
      echo "migrate: $task started; waiting for it to stop"
      aws ecs wait tasks-stopped --region "$REGION" --cluster "$CLUSTER" --tasks "$task"
      code=$(aws ecs describe-tasks --region "$REGION" --cluster "$CLUSTER" --tasks "$task" \
        --query 'tasks[0].containers[0].exitCode' --output text)
      if [ "$code" != "0" ]; then
        echo "migrate: db-writer migrate exited with $code; services not updated (logs: $LOG_GROUP)" >&2
        exit 1
      fi
      echo "migrate: done"
    EOT
    environment = {
      REGION          = var.aws_region
      CLUSTER         = aws_ecs_cluster.this.name
      TASK_DEFINITION = aws_ecs_task_definition.migrate.arn
      SUBNETS         = join(",", aws_subnet.private[*].id)
      SECURITY_GROUP  = aws_security_group.multiplexer.id
      LOG_GROUP       = aws_cloudwatch_log_group.migrate.name
    }
  }

  # The shards must accept connections (RDS up, the secret written) before the task runs.
  depends_on = [aws_db_instance.shard, aws_secretsmanager_secret_version.shard_dsns]
}
