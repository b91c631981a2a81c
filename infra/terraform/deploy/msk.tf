# Managed Kafka: 3 brokers, one per availability zone, private subnets only.
#
# Broker defaults mirror infra/scripts/kafka.sh's cluster mode; topic-level settings come from
# infra/topics.json through the kafka-topics module (topics.tf), not from here.

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

  encryption_info {
    encryption_in_transit {
      # The Rust clients (chat-common KafkaConfig) set no security.protocol, so they speak
      # PLAINTEXT on 9092. TLS stays on between brokers. Switch to "TLS" once the clients
      # support it.
      client_broker = "PLAINTEXT"
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
