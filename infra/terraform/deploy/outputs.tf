output "vpc_id" {
  description = "Id of the VPC holding the stack."
  value       = aws_vpc.this.id
}

output "nlb_dns_name" {
  description = "DNS name of the gateways' NLB; point the public DNS record at it."
  value       = aws_lb.gateway.dns_name
}

output "websocket_url" {
  description = "Websocket URL of the gateways through the NLB (wss:// when certificate_arn is set)."
  value       = "${var.certificate_arn != null ? "wss" : "ws"}://${aws_lb.gateway.dns_name}:443/ws"
}

output "kafka_bootstrap_brokers" {
  description = "KAFKA_BROKERS of the processes: MSK's SASL/SCRAM-over-TLS bootstrap brokers (private addresses, port 9096)."
  value       = aws_msk_cluster.this.bootstrap_brokers_sasl_scram
}

output "topic_names" {
  description = "Every topic created by the kafka-topics module."
  value       = module.kafka_topics.topic_names
}

output "outbound_topics" {
  description = "Map of gateway id to its outbound topic."
  value       = module.kafka_topics.outbound_topics
}

output "shard_endpoints" {
  description = "host:port of each shard, in shard order (the order of SHARD_DSNS)."
  value       = [for db in aws_db_instance.shard : "${db.address}:${db.port}"]
}

output "master_dsns_secret_arn" {
  description = "ARN of the Secrets Manager secret holding SHARD_DSNS as the RDS master user (passwords included): the roles task's; no service signs in with it."
  value       = aws_secretsmanager_secret.master_dsns.arn
}

output "role_dsns_secret_arns" {
  description = "Map of Postgres role (chat_owner, chat_writer, chat_reader) to the ARN of the secret holding SHARD_DSNS as that role (passwords included)."
  value       = { for role, secret in aws_secretsmanager_secret.role_dsns : role => secret.arn }
}

output "db_role_secret_arns" {
  description = "Map of Postgres role to the ARN of the secret holding its password ({username, password})."
  value       = { for role, secret in aws_secretsmanager_secret.db_role : role => secret.arn }
}

output "ecs_cluster_name" {
  description = "Name of the ECS cluster running the gateways and multiplexers."
  value       = aws_ecs_cluster.this.name
}

output "gateway_services" {
  description = "Map of gateway id to the name of its ECS service."
  value       = { for id, svc in aws_ecs_service.gateway : id => svc.name }
}

output "multiplexer_service" {
  description = "Name of the multiplexer ECS service."
  value       = aws_ecs_service.multiplexer.name
}

output "security_group_ids" {
  description = "Security group ids by role (nlb, gateway, multiplexer, kafka, db)."
  value = {
    nlb         = aws_security_group.nlb.id
    gateway     = aws_security_group.gateway.id
    multiplexer = aws_security_group.multiplexer.id
    kafka       = aws_security_group.kafka.id
    db          = aws_security_group.db.id
  }
}
