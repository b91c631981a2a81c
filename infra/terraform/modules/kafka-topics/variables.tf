variable "topics_file" {
  description = "Path of the topic settings file. Leave null to use infra/topics.json (found relative to this module), the one source of truth shared with the Rust admin code; override only to test another copy."
  type        = string
  default     = null
}

variable "gateway_ids" {
  description = "Ids of the running gateways (the GATEWAY_ID of each); one outbound-<id> topic is created per id. Same alphabet as GatewayId in chat-common: 1 to 64 characters of [A-Za-z0-9_.-]."
  type        = list(string)

  validation {
    condition     = length(var.gateway_ids) > 0 && alltrue([for id in var.gateway_ids : can(regex("^[A-Za-z0-9_.-]{1,64}$", id))])
    error_message = "gateway_ids must be a non-empty list of ids of 1 to 64 characters from [A-Za-z0-9_.-]."
  }
}

variable "retired_gateway_ids" {
  description = "Ids of gateways that no longer run but whose outbound-<id> topic must stay: the presence log may still name them, and the multiplexer retries a produce to a missing topic forever. Move an id here first, delete it only once presence no longer routes to it."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for id in var.retired_gateway_ids : can(regex("^[A-Za-z0-9_.-]{1,64}$", id))])
    error_message = "retired_gateway_ids must be ids of 1 to 64 characters from [A-Za-z0-9_.-]."
  }
}

variable "replication_factor" {
  description = "Replication factor of every topic (3 on a production cluster of 3 or more brokers)."
  type        = number
  default     = 3

  validation {
    condition     = var.replication_factor >= 1
    error_message = "replication_factor must be at least 1."
  }
}

variable "min_insync_replicas" {
  description = "min.insync.replicas of every topic (2 with a replication factor of 3, so acks=all survives one broker down). Must not exceed replication_factor."
  type        = number
  default     = 2

  validation {
    condition     = var.min_insync_replicas >= 1
    error_message = "min_insync_replicas must be at least 1."
  }
}

variable "topic_prefix" {
  description = "Prefix of every topic name; must equal the TOPIC_PREFIX given to gateways and multiplexers (\"\" in production)."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]*$", var.topic_prefix))
    error_message = "topic_prefix may only contain [A-Za-z0-9_.-] (legal in Kafka topic names)."
  }
}
