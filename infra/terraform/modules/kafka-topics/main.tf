# The chat pipeline's topics: inbound, inbound-dlq (its dead letters), presence and one
# outbound-<gateway_id> per gateway.
#
# Partitions and topic-level settings come from infra/topics.json, the single source of truth
# that the Rust admin code (chat-common `TopicSpecs`, `chatctl topics`) reads too. Do not copy a
# setting from that file into this module: change the file, and both sides follow.
# Only what depends on the cluster is set here: the replication factor and min.insync.replicas.

locals {
  topics_file = var.topics_file != null ? var.topics_file : "${path.module}/../../../topics.json"
  topics_json = jsondecode(file(local.topics_file))

  # Keys starting with "_" are comments.
  specs = { for kind, spec in local.topics_json : kind => spec if !startswith(kind, "_") }

  # Set after the file's config, as the Rust `ensure_topics` does, so the cluster decides it.
  cluster_config = { "min.insync.replicas" = tostring(var.min_insync_replicas) }

  outbound_ids = toset(concat(var.gateway_ids, var.retired_gateway_ids))

  expected_kinds = "inbound,inbound-dlq,outbound,presence"
}

resource "kafka_topic" "inbound" {
  name               = "${var.topic_prefix}inbound"
  replication_factor = var.replication_factor
  partitions         = local.specs["inbound"].partitions
  config             = merge(local.specs["inbound"].config, local.cluster_config)

  lifecycle {
    precondition {
      condition     = join(",", sort(keys(local.specs))) == local.expected_kinds
      error_message = "topics.json must describe exactly the topic kinds inbound, inbound-dlq, outbound and presence (the Rust TopicSpecs struct reads those four)."
    }
    precondition {
      condition     = var.min_insync_replicas <= var.replication_factor
      error_message = "min_insync_replicas must not exceed replication_factor, or no produce with acks=all can succeed."
    }
  }
}

# Records of inbound that can never be processed, set aside by the multiplexer (chat.v1.DeadLetter).
resource "kafka_topic" "inbound_dlq" {
  name               = "${var.topic_prefix}inbound-dlq"
  replication_factor = var.replication_factor
  partitions         = local.specs["inbound-dlq"].partitions
  config             = merge(local.specs["inbound-dlq"].config, local.cluster_config)
}

resource "kafka_topic" "presence" {
  name               = "${var.topic_prefix}presence"
  replication_factor = var.replication_factor
  partitions         = local.specs["presence"].partitions
  config             = merge(local.specs["presence"].config, local.cluster_config)
}

resource "kafka_topic" "outbound" {
  for_each = local.outbound_ids

  name               = "${var.topic_prefix}outbound-${each.key}"
  replication_factor = var.replication_factor
  partitions         = local.specs["outbound"].partitions
  config             = merge(local.specs["outbound"].config, local.cluster_config)
}
