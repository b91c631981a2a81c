output "inbound_topic" {
  description = "Name of the inbound topic (client messages and acks, keyed by conversation)."
  value       = kafka_topic.inbound.name
}

output "inbound_dlq_topic" {
  description = "Name of the dead-letter topic of inbound (records the multiplexer set aside, with their reason)."
  value       = kafka_topic.inbound_dlq.name
}

output "presence_topic" {
  description = "Name of the compacted presence topic (which gateway holds which user)."
  value       = kafka_topic.presence.name
}

output "outbound_topics" {
  description = "Map of gateway id to the name of its outbound-<id> topic (retired ids included)."
  value       = { for id, topic in kafka_topic.outbound : id => topic.name }
}

output "topic_names" {
  description = "Every topic this module manages, sorted."
  value       = sort(concat([kafka_topic.inbound.name, kafka_topic.inbound_dlq.name, kafka_topic.presence.name], [for t in kafka_topic.outbound : t.name]))
}

output "inbound_partitions" {
  description = "Partition count of the inbound topic: the most multiplexers of one consumer group that can do work."
  value       = kafka_topic.inbound.partitions
}
