# The application on ECS Fargate, in the private subnets.
#
# Gateways: one ECS service per gateway id, each with exactly one task. An id must never run
# twice: it names the outbound-<id> topic and the consumer group gateway-<id>, and a second
# task would take half the partitions and drop pushes for users connected to the first. Hence
# one task per service and deployments that stop the old task before starting the new one.
#
# Multiplexers: one service, one consumer group over inbound, scaled between
# multiplexer_min_count and multiplexer_max_count (at most the inbound partition count).

resource "aws_ecs_cluster" "this" {
  name = var.name

  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_cloudwatch_log_group" "gateway" {
  name              = "/${var.name}/gateway"
  retention_in_days = var.log_retention_days
}

resource "aws_cloudwatch_log_group" "multiplexer" {
  name              = "/${var.name}/multiplexer"
  retention_in_days = var.log_retention_days
}

# --- IAM ---------------------------------------------------------------------------------------

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "task_execution" {
  name_prefix        = "${var.name}-exec-"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

resource "aws_iam_role_policy_attachment" "task_execution" {
  role       = aws_iam_role.task_execution.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

data "aws_iam_policy_document" "read_secrets" {
  statement {
    actions = ["secretsmanager:GetSecretValue"]
    resources = concat(
      [aws_secretsmanager_secret.master_dsns.arn, var.jwt_secret_arn],
      [for role in local.db_roles : aws_secretsmanager_secret.role_dsns[role].arn],
      [for role in local.db_roles : aws_secretsmanager_secret.db_role[role].arn],
      [for u in concat(["multiplexer"], [for id in var.gateway_ids : "gateway-${id}"]) : aws_secretsmanager_secret.kafka_user[u].arn],
    )
  }
  # The Kafka users' and the Postgres roles' secrets are encrypted with keys of their own
  # (kafka_users.tf, db_roles.tf).
  statement {
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.kafka_users.arn, aws_kms_key.db_roles.arn]
  }
}

resource "aws_iam_role_policy" "task_execution_secrets" {
  name   = "read-secrets"
  role   = aws_iam_role.task_execution.id
  policy = data.aws_iam_policy_document.read_secrets.json
}

# --- Shared container settings ------------------------------------------------------------------

locals {
  common_environment = [
    # TLS and SCRAM only (msk.tf); each task signs in as its service's user.
    { name = "KAFKA_BROKERS", value = aws_msk_cluster.this.bootstrap_brokers_sasl_scram },
    { name = "KAFKA_SECURITY_PROTOCOL", value = "sasl_ssl" },
    { name = "KAFKA_SASL_MECHANISM", value = "SCRAM-SHA-512" },
    { name = "TOPIC_PREFIX", value = var.topic_prefix },
    { name = "SHARD_POOL_SIZE", value = tostring(var.shard_pool_size) },
    { name = "LOG_FORMAT", value = "json" },
    { name = "RUST_LOG", value = var.rust_log },
  ]

  # The password of a Kafka user, from the JSON of its secret.
  kafka_password = { for u in local.kafka_users : u => { name = "KAFKA_SASL_PASSWORD", valueFrom = "${aws_secretsmanager_secret.kafka_user[u].arn}:password::" } }
}

# --- Gateways ------------------------------------------------------------------------------------

resource "aws_ecs_task_definition" "gateway" {
  for_each = toset(var.gateway_ids)

  family                   = "${var.name}-gateway-${each.key}"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.gateway_cpu
  memory                   = var.gateway_memory
  execution_role_arn       = aws_iam_role.task_execution.arn

  container_definitions = jsonencode([{
    name        = "gateway"
    image       = var.gateway_image
    essential   = true
    stopTimeout = 30
    # 8080: clients (through the NLB); 9100: /metrics, /healthz, /readyz (the monitoring CIDRs
    # and the NLB's health checks only, see security.tf).
    portMappings = [
      { containerPort = 8080, protocol = "tcp" },
      { containerPort = 9100, protocol = "tcp" },
    ]
    environment = concat(local.common_environment, [
      { name = "GATEWAY_ID", value = each.key },
      { name = "KAFKA_SASL_USERNAME", value = "gateway-${each.key}" },
      # The defaults (127.0.0.1) would be unreachable from the NLB and from Prometheus.
      { name = "GATEWAY_ADDR", value = "0.0.0.0:8080" },
      { name = "GATEWAY_METRICS_ADDR", value = "0.0.0.0:9100" },
      { name = "JWT_ISSUER", value = var.jwt_issuer },
      { name = "JWT_AUDIENCE", value = var.jwt_audience },
      { name = "DEV_TOKENS", value = "false" },
      # The conversation list shows previews only in keep mode.
      { name = "RETENTION", value = var.retention },
    ])
    secrets = [
      # Signed in to the shards as chat_reader: a gateway only reads them.
      { name = "SHARD_DSNS", valueFrom = aws_secretsmanager_secret.role_dsns["chat_reader"].arn },
      { name = "JWT_SECRET", valueFrom = var.jwt_secret_arn },
      local.kafka_password["gateway-${each.key}"],
    ]
    ulimits = [{ name = "nofile", softLimit = 65536, hardLimit = 65536 }]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        "awslogs-group"         = aws_cloudwatch_log_group.gateway.name
        "awslogs-region"        = var.aws_region
        "awslogs-stream-prefix" = each.key
      }
    }
  }])
}

resource "aws_ecs_service" "gateway" {
  for_each = toset(var.gateway_ids)

  name            = "${var.name}-gateway-${each.key}"
  cluster         = aws_ecs_cluster.this.id
  task_definition = aws_ecs_task_definition.gateway[each.key].arn
  launch_type     = "FARGATE"
  desired_count   = 1

  # Never two tasks with the same GATEWAY_ID (see the top of this file).
  deployment_minimum_healthy_percent = 0
  deployment_maximum_percent         = 100

  health_check_grace_period_seconds = 60

  # A new chat_reader password (db_roles.tf) reaches the tasks only when they start: roll them.
  force_new_deployment = true
  triggers = {
    shard_dsns = aws_secretsmanager_secret_version.role_dsns["chat_reader"].version_id
  }

  network_configuration {
    subnets          = aws_subnet.private[*].id
    security_groups  = [aws_security_group.gateway.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.gateway.arn
    container_name   = "gateway"
    container_port   = 8080
  }

  # New images start only once the shards have the roles and the schema they need (db_roles.tf,
  # migrate.tf).
  depends_on = [aws_lb_listener.gateway_443, module.kafka_topics, terraform_data.db_roles, terraform_data.migrate]
}

# --- Multiplexers ---------------------------------------------------------------------------

resource "aws_ecs_task_definition" "multiplexer" {
  family                   = "${var.name}-multiplexer"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.multiplexer_cpu
  memory                   = var.multiplexer_memory
  execution_role_arn       = aws_iam_role.task_execution.arn

  container_definitions = jsonencode([{
    name         = "multiplexer"
    image        = var.multiplexer_image
    essential    = true
    stopTimeout  = 60
    portMappings = [{ containerPort = 9300, protocol = "tcp" }]
    environment = concat(local.common_environment, [
      # Prefixed like the gateways' groups, so stacks sharing a cluster stay apart.
      { name = "MULTIPLEXER_GROUP", value = "${var.topic_prefix}multiplexer" },
      { name = "KAFKA_SASL_USERNAME", value = "multiplexer" },
      { name = "MULTIPLEXER_HTTP_ADDR", value = "0.0.0.0:9300" },
      { name = "RETENTION", value = var.retention },
      { name = "UNACKED_TTL_SECS", value = tostring(var.unacked_ttl_seconds) },
      { name = "ERASED_ROW_TTL_SECS", value = tostring(var.erased_row_ttl_seconds) },
      # Migrations run once, before the services update, as their own task and as the owner
      # (migrate.tf): not from a new task while old ones still run, and chat_writer may not.
      { name = "MULTIPLEXER_MIGRATE", value = "false" },
    ])
    secrets = [
      # Signed in to the shards as chat_writer: rows only, no DDL (hence MULTIPLEXER_MIGRATE).
      { name = "SHARD_DSNS", valueFrom = aws_secretsmanager_secret.role_dsns["chat_writer"].arn },
      local.kafka_password["multiplexer"],
    ]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        "awslogs-group"         = aws_cloudwatch_log_group.multiplexer.name
        "awslogs-region"        = var.aws_region
        "awslogs-stream-prefix" = "multiplexer"
      }
    }
  }])
}

resource "aws_ecs_service" "multiplexer" {
  name            = "${var.name}-multiplexer"
  cluster         = aws_ecs_cluster.this.id
  task_definition = aws_ecs_task_definition.multiplexer.arn
  launch_type     = "FARGATE"
  desired_count   = var.multiplexer_min_count

  # A new chat_writer password (db_roles.tf) reaches the tasks only when they start: roll them.
  force_new_deployment = true
  triggers = {
    shard_dsns = aws_secretsmanager_secret_version.role_dsns["chat_writer"].version_id
  }

  network_configuration {
    subnets          = aws_subnet.private[*].id
    security_groups  = [aws_security_group.multiplexer.id]
    assign_public_ip = false
  }

  lifecycle {
    # The autoscaler owns the count after creation.
    ignore_changes = [desired_count]

    precondition {
      condition     = var.multiplexer_max_count <= module.kafka_topics.inbound_partitions
      error_message = "multiplexer_max_count exceeds the inbound partition count in infra/topics.json: the extra consumers would sit idle."
    }
    precondition {
      condition     = var.multiplexer_min_count <= var.multiplexer_max_count
      error_message = "multiplexer_min_count must not exceed multiplexer_max_count."
    }
  }

  depends_on = [module.kafka_topics, terraform_data.db_roles, terraform_data.migrate]
}

resource "aws_appautoscaling_target" "multiplexer" {
  service_namespace  = "ecs"
  scalable_dimension = "ecs:service:DesiredCount"
  resource_id        = "service/${aws_ecs_cluster.this.name}/${aws_ecs_service.multiplexer.name}"
  min_capacity       = var.multiplexer_min_count
  max_capacity       = var.multiplexer_max_count
}

resource "aws_appautoscaling_policy" "multiplexer_cpu" {
  name               = "${var.name}-multiplexer-cpu"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.multiplexer.service_namespace
  scalable_dimension = aws_appautoscaling_target.multiplexer.scalable_dimension
  resource_id        = aws_appautoscaling_target.multiplexer.resource_id

  target_tracking_scaling_policy_configuration {
    target_value = var.multiplexer_cpu_target

    predefined_metric_specification {
      predefined_metric_type = "ECSServiceAverageCPUUtilization"
    }

    # Every scale event rebalances the consumer group: scale in slowly.
    scale_in_cooldown  = 600
    scale_out_cooldown = 120
  }
}
