# Managed Kafka: 3 brokers, one per availability zone, private subnets only.
#
# Broker defaults mirror infra/scripts/kafka.sh's cluster mode; topic-level settings come from
# infra/topics.json through the kafka-topics module (topics.tf), not from here.
#
# Clients reach the brokers only over TLS with SASL/SCRAM (port 9096), each service as its own
# user (kafka_users.tf), with ACLs that give each what it needs (kafka_acls.tf). See
# docs/security.md and, for the first apply, infra/terraform/README.md.

resource "aws_msk_configuration" "this" {
  name           = "${var.name}-kafka"
  kafka_versions = [var.kafka_version]

  server_properties = <<-EOT
    auto.create.topics.enable=false
    default.replication.factor=3
    min.insync.replicas=2
    unclean.leader.election.enable=false
    offsets.topic.replication.factor=3
    transaction.state.log.replication.factor=3
    transaction.state.log.min.isr=2
    allow.everyone.if.no.acl.found=${var.kafka_acls_enforced ? "false" : "true"}
  EOT
}

resource "aws_cloudwatch_log_group" "kafka" {
  name              = "/${var.name}/msk"
  retention_in_days = var.log_retention_days
}

resource "aws_msk_cluster" "this" {
  cluster_name           = var.name
  kafka_version          = var.kafka_version
  number_of_broker_nodes = 3
  enhanced_monitoring    = "PER_BROKER"

  broker_node_group_info {
    instance_type   = var.kafka_instance_type
    client_subnets  = aws_subnet.private[*].id
    security_groups = [aws_security_group.kafka.id]

    storage_info {
      ebs_storage_info {
        volume_size = var.kafka_volume_size_gb
      }
    }

    connectivity_info {
      public_access {
        type = "DISABLED"
      }
    }
  }

  configuration_info {
    arn      = aws_msk_configuration.this.arn
    revision = aws_msk_configuration.this.latest_revision
  }

  # SASL/SCRAM over TLS only: no plaintext listener, no unauthenticated access.
  client_authentication {
    sasl {
      scram = true
    }
    unauthenticated = false
  }

  encryption_info {
    encryption_in_transit {
      client_broker = "TLS"
      in_cluster    = true
    }
  }

  # Brokers expose Prometheus JMX and node exporters on 11001/11002 (consumer lag, ISR counts).
  open_monitoring {
    prometheus {
      jmx_exporter {
        enabled_in_broker = true
      }
      node_exporter {
        enabled_in_broker = true
      }
    }
  }

  logging_info {
    broker_logs {
      cloudwatch_logs {
        enabled   = true
        log_group = aws_cloudwatch_log_group.kafka.name
      }
    }
  }
}
