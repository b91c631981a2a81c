# ---------------------------------------------------------------------------------------------
# General
# ---------------------------------------------------------------------------------------------

variable "aws_region" {
  description = "AWS region to deploy into; it needs at least 3 availability zones (MSK brokers and subnets are spread over 3)."
  type        = string
  default     = "eu-west-1"
}

variable "name" {
  description = "Name prefix of every resource (also the \"app\" tag)."
  type        = string
  default     = "chat"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name must be 2 to 21 characters of lowercase letters, digits and dashes, starting with a letter."
  }
}

variable "tags" {
  description = "Extra tags put on every resource."
  type        = map(string)
  default     = {}
}

# ---------------------------------------------------------------------------------------------
# Network and exposure
# ---------------------------------------------------------------------------------------------

variable "vpc_cidr" {
  description = "CIDR block of the VPC; split into 3 public subnets (NLB, NAT) and 3 private subnets (tasks, MSK, RDS)."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrnetmask(var.vpc_cidr))
    error_message = "vpc_cidr must be an IPv4 CIDR block."
  }
}

variable "client_cidr_blocks" {
  description = "CIDR blocks allowed to reach the NLB listeners (the only thing exposed to the internet)."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "monitoring_cidr_blocks" {
  description = "CIDR blocks of the Prometheus servers allowed to scrape the tasks directly (gateway :9100/metrics, the operations port, never the client port; multiplexer :9300/metrics). Keep them inside the VPC or a peered network."
  type        = list(string)
  default     = []

  validation {
    condition     = !contains(var.monitoring_cidr_blocks, "0.0.0.0/0")
    error_message = "Metrics must not be reachable from the whole internet."
  }
}

variable "monitoring_security_group_ids" {
  description = "Security groups of Prometheus servers in this VPC allowed to scrape the gateways' operations port (:9100/metrics), besides monitoring_cidr_blocks."
  type        = list(string)
  default     = []
}

variable "kafka_admin_cidr_blocks" {
  description = "CIDR blocks (VPN, bastion) allowed to reach the MSK brokers on 9096 (SASL/SCRAM over TLS), so the Kafka provider of this configuration and chatctl can manage topics. Never 0.0.0.0/0."
  type        = list(string)
  default     = []

  validation {
    condition     = !contains(var.kafka_admin_cidr_blocks, "0.0.0.0/0")
    error_message = "Kafka must not be reachable from the whole internet."
  }
}

variable "certificate_arn" {
  description = "ACM certificate ARN for the port-443 listener. Set: the NLB terminates TLS (wss://; idle timeout fixed at 350 s by AWS). Null: port 443 is plain TCP passed through to the gateways (use only behind another TLS terminator)."
  type        = string
  default     = null
}

variable "enable_plaintext_listener" {
  description = "Also expose the gateways' plain port 8080 on the NLB (TCP, long idle timeout). Off by default: tokens would cross the internet unencrypted."
  type        = bool
  default     = false
}

variable "nlb_tcp_idle_timeout_seconds" {
  description = "Idle timeout of the NLB's TCP listeners, in seconds (60 to 6000). Websockets idle longer than this without a ping are cut; TLS listeners always use 350 s."
  type        = number
  default     = 3600

  validation {
    condition     = var.nlb_tcp_idle_timeout_seconds >= 60 && var.nlb_tcp_idle_timeout_seconds <= 6000
    error_message = "nlb_tcp_idle_timeout_seconds must be between 60 and 6000."
  }
}

# ---------------------------------------------------------------------------------------------
# Kafka (MSK)
# ---------------------------------------------------------------------------------------------

variable "kafka_version" {
  description = "Apache Kafka version of the MSK cluster."
  type        = string
  default     = "3.7.x"
}

variable "kafka_instance_type" {
  description = "MSK broker instance type (3 brokers, one per availability zone)."
  type        = string
  default     = "kafka.m7g.large"
}

variable "kafka_volume_size_gb" {
  description = "EBS volume size of each broker, in GiB."
  type        = number
  default     = 500
}

variable "topic_prefix" {
  description = "Prefix of every topic name, passed to the kafka-topics module and as TOPIC_PREFIX to every process (\"\" in production)."
  type        = string
  default     = ""
}

# ---------------------------------------------------------------------------------------------
# Postgres shards (RDS)
# ---------------------------------------------------------------------------------------------

variable "shard_count" {
  description = "Number of Postgres shards, one RDS instance each. SHARD_DSNS lists them in index order and the locator is a jump hash over that order: shards may only be appended, and changing the count moves conversations (plan a data migration first)."
  type        = number
  default     = 4

  validation {
    condition     = var.shard_count >= 1 && floor(var.shard_count) == var.shard_count
    error_message = "shard_count must be a whole number of at least 1."
  }
}

variable "postgres_version" {
  description = "Postgres major version of the shards (the parameter group family follows it)."
  type        = string
  default     = "16"
}

variable "db_instance_class" {
  description = "RDS instance class of each shard."
  type        = string
  default     = "db.r6g.large"
}

variable "db_allocated_storage_gb" {
  description = "Initial storage of each shard, in GiB."
  type        = number
  default     = 100
}

variable "db_max_allocated_storage_gb" {
  description = "Storage autoscaling ceiling of each shard, in GiB."
  type        = number
  default     = 1000
}

variable "db_multi_az" {
  description = "Run each shard as a Multi-AZ RDS instance (standby in another zone)."
  type        = bool
  default     = true
}

variable "db_backup_retention_days" {
  description = "Days of automated backups kept for each shard."
  type        = number
  default     = 7
}

variable "db_deletion_protection" {
  description = "Protect the shard instances against deletion (turn off only to tear a test stack down)."
  type        = bool
  default     = true
}

# ---------------------------------------------------------------------------------------------
# Application
# ---------------------------------------------------------------------------------------------

variable "gateway_image" {
  description = "Container image of the gateway (e.g. <account>.dkr.ecr.<region>.amazonaws.com/chat-gateway:<tag>)."
  type        = string
}

variable "multiplexer_image" {
  description = "Container image of the multiplexer."
  type        = string
}

variable "db_writer_image" {
  description = "Container image holding the db-writer binary, run as the one-off migration task (migrate.tf). Empty: the multiplexer image, which must then contain db-writer."
  type        = string
  default     = ""
}

variable "migrate_command" {
  description = "Command of the migration task's container: what applies the shard migrations in db_writer_image."
  type        = list(string)
  default     = ["db-writer", "migrate"]
}

variable "db_roles_command" {
  description = "Command of the roles task's container: what creates the shards' Postgres roles (chat_owner, chat_writer, chat_reader) and their grants in db_writer_image, signed in as the RDS master user."
  type        = list(string)
  default     = ["db-writer", "roles"]
}

variable "run_migrations" {
  description = "Before the services are updated, run the roles task (db-writer roles) and then the shard migrations (db-writer migrate) as one-off ECS tasks, and fail the apply if either fails (needs the aws CLI where terraform runs). False: run both yourself before applying new images or new role passwords."
  type        = bool
  default     = true
}

variable "gateway_ids" {
  description = "Ids of the gateways. Each id gets its own ECS service (one task: GATEWAY_ID must be unique, and it names the outbound-<id> topic and the consumer group gateway-<id>) and its own topic. Add an id to scale out."
  type        = list(string)
  default     = ["gw1", "gw2", "gw3"]

  validation {
    condition     = length(var.gateway_ids) > 0 && length(distinct(var.gateway_ids)) == length(var.gateway_ids) && alltrue([for id in var.gateway_ids : can(regex("^[A-Za-z0-9_.-]{1,64}$", id))])
    error_message = "gateway_ids must be distinct ids of 1 to 64 characters from [A-Za-z0-9_.-]."
  }
}

variable "retired_gateway_ids" {
  description = "Ids of removed gateways whose outbound topic is kept until presence no longer routes to them (see the kafka-topics module)."
  type        = list(string)
  default     = []
}

variable "gateway_cpu" {
  description = "CPU units of a gateway task (1024 = 1 vCPU)."
  type        = number
  default     = 1024
}

variable "gateway_memory" {
  description = "Memory of a gateway task, in MiB."
  type        = number
  default     = 2048
}

variable "multiplexer_cpu" {
  description = "CPU units of a multiplexer task (1024 = 1 vCPU)."
  type        = number
  default     = 1024
}

variable "multiplexer_memory" {
  description = "Memory of a multiplexer task, in MiB."
  type        = number
  default     = 2048
}

variable "multiplexer_min_count" {
  description = "Fewest multiplexer tasks (the autoscaler's floor and the initial desired count)."
  type        = number
  default     = 2

  validation {
    condition     = var.multiplexer_min_count >= 1
    error_message = "At least one multiplexer must run."
  }
}

variable "multiplexer_max_count" {
  description = "Most multiplexer tasks. Must not exceed the inbound topic's partition count (from infra/topics.json): extra consumers of the group would sit idle."
  type        = number
  default     = 6
}

variable "multiplexer_cpu_target" {
  description = "Average CPU utilisation (percent) the multiplexer autoscaler aims for."
  type        = number
  default     = 60
}

variable "jwt_secret_arn" {
  description = "ARN of a Secrets Manager secret whose plain value is the HS256 key that verifies client tokens (JWT_SECRET). Required: without it the gateway falls back to the public dev secret."
  type        = string

  validation {
    condition     = startswith(var.jwt_secret_arn, "arn:")
    error_message = "jwt_secret_arn must be a Secrets Manager ARN."
  }
}

variable "jwt_issuer" {
  description = "Expected iss claim of client tokens (JWT_ISSUER)."
  type        = string
}

variable "jwt_audience" {
  description = "Expected aud claim of client tokens (JWT_AUDIENCE)."
  type        = string
}

variable "shard_pool_size" {
  description = "Connections per shard in each process's pool (SHARD_POOL_SIZE). Mind max_connections: (gateways + 2 x multiplexers) x pool size per shard (a multiplexer keeps two pools per shard: one for its statements with generic plans), plus 4 per gateway in delete-on-ack mode (its pushes' key reads)."
  type        = number
  default     = 8
}

variable "retention" {
  description = "Message retention mode of the multiplexer (RETENTION): keep or delete-on-ack."
  type        = string
  default     = "keep"

  validation {
    condition     = contains(["keep", "delete-on-ack"], var.retention)
    error_message = "retention must be keep or delete-on-ack."
  }
}

variable "unacked_ttl_seconds" {
  description = "With retention = delete-on-ack: how long an unacked message is kept before the multiplexer's sweep erases its body (UNACKED_TTL_SECS)."
  type        = number
  default     = 2592000

  validation {
    condition     = var.unacked_ttl_seconds >= 60
    error_message = "unacked_ttl_seconds must be at least 60."
  }
}

variable "erased_row_ttl_seconds" {
  description = "With retention = delete-on-ack: how long the row of an acknowledged message (from its send) or an expired one (from its expiry), and the record of a message set aside (from its failure), is kept before it is deleted, leaving the conversation's counters (ERASED_ROW_TTL_SECS). Longer than inbound's retention, so a replay of the log never stores an erased message again."
  type        = number
  default     = 691200

  validation {
    condition     = var.erased_row_ttl_seconds > 7 * 24 * 3600
    error_message = "erased_row_ttl_seconds must be longer than inbound's retention (7 days)."
  }
}

variable "rust_log" {
  description = "RUST_LOG filter of every process."
  type        = string
  default     = "info"
}

variable "log_retention_days" {
  description = "Days the CloudWatch log groups keep the processes' logs."
  type        = number
  default     = 30
}

# ---------------------------------------------------------------------------------------------
# Security of the links to Kafka and Postgres (docs/security.md)
# ---------------------------------------------------------------------------------------------

variable "kafka_acls_enforced" {
  description = "MSK refuses every user that holds no ACL for what it asks (allow.everyone.if.no.acl.found=false). The first apply of a new cluster needs false, so that the admin user can create the ACLs (its own included); apply again with true (see infra/terraform/README.md)."
  type        = bool
  default     = true
}

variable "rds_ca_bundle_path" {
  description = "Path, inside the gateway and multiplexer images, of the RDS CA bundle (global-bundle.pem) against which the shards' certificates and names are checked (sslmode=verify-full)."
  type        = string
  default     = "/etc/ssl/certs/rds-global-bundle.pem"
}
