# The topics, from infra/topics.json (the single source of truth) through the shared module.
# Production replication: 3 replicas, min.insync.replicas 2 (the producers use acks=all).

module "kafka_topics" {
  source = "../modules/kafka-topics"

  gateway_ids         = var.gateway_ids
  retired_gateway_ids = var.retired_gateway_ids
  topic_prefix        = var.topic_prefix
  replication_factor  = 3
  min_insync_replicas = 2

  depends_on = [aws_msk_cluster.this]
}
