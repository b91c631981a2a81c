# Security groups. Only the NLB accepts traffic from the internet; the gateways accept it only
# from the NLB; Kafka and the Postgres shards accept it only from the application's groups (and
# Kafka from the operators' admin range, for topic management).

resource "aws_security_group" "nlb" {
  name        = "${var.name}-nlb"
  description = "Internet-facing NLB in front of the gateways"
  vpc_id      = aws_vpc.this.id
}

resource "aws_security_group" "gateway" {
  name        = "${var.name}-gateway"
  description = "Gateway tasks (HTTP and websocket on 8080, operations on 9100)"
  vpc_id      = aws_vpc.this.id
}

resource "aws_security_group" "multiplexer" {
  name        = "${var.name}-multiplexer"
  description = "Multiplexer tasks (metrics on 9300)"
  vpc_id      = aws_vpc.this.id
}

resource "aws_security_group" "kafka" {
  name        = "${var.name}-kafka"
  description = "MSK brokers, reachable from the application only"
  vpc_id      = aws_vpc.this.id
}

resource "aws_security_group" "db" {
  name        = "${var.name}-db"
  description = "Postgres shards, reachable from the application only"
  vpc_id      = aws_vpc.this.id
}

# --- NLB: the only internet-facing ingress ---------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "nlb_https" {
  for_each = toset(var.client_cidr_blocks)

  security_group_id = aws_security_group.nlb.id
  description       = "Clients to the 443 listener"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_ingress_rule" "nlb_plain" {
  for_each = var.enable_plaintext_listener ? toset(var.client_cidr_blocks) : toset([])

  security_group_id = aws_security_group.nlb.id
  description       = "Clients to the plain 8080 listener"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 8080
  to_port           = 8080
}

resource "aws_vpc_security_group_egress_rule" "nlb_to_gateway" {
  security_group_id            = aws_security_group.nlb.id
  description                  = "Forward client traffic to the gateways"
  referenced_security_group_id = aws_security_group.gateway.id
  ip_protocol                  = "tcp"
  from_port                    = 8080
  to_port                      = 8080
}

resource "aws_vpc_security_group_egress_rule" "nlb_health_to_gateway" {
  security_group_id            = aws_security_group.nlb.id
  description                  = "Health checks of the gateways (/readyz on the operations port)"
  referenced_security_group_id = aws_security_group.gateway.id
  ip_protocol                  = "tcp"
  from_port                    = 9100
  to_port                      = 9100
}

# --- Gateways --------------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "gateway_from_nlb" {
  security_group_id            = aws_security_group.gateway.id
  description                  = "Client traffic from the NLB"
  referenced_security_group_id = aws_security_group.nlb.id
  ip_protocol                  = "tcp"
  from_port                    = 8080
  to_port                      = 8080
}

# The operations port (GATEWAY_METRICS_ADDR: /metrics, /healthz, /readyz) is never forwarded
# by the NLB: only its health checks and the monitoring network reach it.
resource "aws_vpc_security_group_ingress_rule" "gateway_health_from_nlb" {
  security_group_id            = aws_security_group.gateway.id
  description                  = "NLB health checks (/readyz on the operations port)"
  referenced_security_group_id = aws_security_group.nlb.id
  ip_protocol                  = "tcp"
  from_port                    = 9100
  to_port                      = 9100
}

resource "aws_vpc_security_group_ingress_rule" "gateway_metrics" {
  for_each = toset(var.monitoring_cidr_blocks)

  security_group_id = aws_security_group.gateway.id
  description       = "Prometheus scrapes /metrics on the operations port"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 9100
  to_port           = 9100
}

resource "aws_vpc_security_group_ingress_rule" "gateway_metrics_from_group" {
  for_each = toset(var.monitoring_security_group_ids)

  security_group_id            = aws_security_group.gateway.id
  description                  = "Prometheus (by security group) scrapes /metrics on the operations port"
  referenced_security_group_id = each.value
  ip_protocol                  = "tcp"
  from_port                    = 9100
  to_port                      = 9100
}

resource "aws_vpc_security_group_egress_rule" "gateway_all" {
  security_group_id = aws_security_group.gateway.id
  description       = "Kafka, shards, image pulls and AWS APIs"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
}

# --- Multiplexers ----------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "multiplexer_metrics" {
  for_each = toset(var.monitoring_cidr_blocks)

  security_group_id = aws_security_group.multiplexer.id
  description       = "Prometheus scrapes /metrics"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 9300
  to_port           = 9300
}

resource "aws_vpc_security_group_egress_rule" "multiplexer_all" {
  security_group_id = aws_security_group.multiplexer.id
  description       = "Kafka, shards, image pulls and AWS APIs"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
}

# --- Kafka -----------------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "kafka_from_app" {
  for_each = {
    gateway     = aws_security_group.gateway.id
    multiplexer = aws_security_group.multiplexer.id
  }

  security_group_id            = aws_security_group.kafka.id
  description                  = "Kafka clients: ${each.key}"
  referenced_security_group_id = each.value
  ip_protocol                  = "tcp"
  from_port                    = 9096
  to_port                      = 9096
}

resource "aws_vpc_security_group_ingress_rule" "kafka_from_admin" {
  for_each = toset(var.kafka_admin_cidr_blocks)

  security_group_id = aws_security_group.kafka.id
  description       = "Topic management (Terraform Kafka provider, chatctl)"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 9096
  to_port           = 9096
}

resource "aws_vpc_security_group_ingress_rule" "kafka_self" {
  security_group_id            = aws_security_group.kafka.id
  description                  = "Broker to broker"
  referenced_security_group_id = aws_security_group.kafka.id
  ip_protocol                  = "-1"
}

resource "aws_vpc_security_group_egress_rule" "kafka_self" {
  security_group_id            = aws_security_group.kafka.id
  description                  = "Broker to broker"
  referenced_security_group_id = aws_security_group.kafka.id
  ip_protocol                  = "-1"
}

# --- Postgres shards -------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "db_from_app" {
  for_each = {
    gateway     = aws_security_group.gateway.id
    multiplexer = aws_security_group.multiplexer.id
  }

  security_group_id            = aws_security_group.db.id
  description                  = "Postgres clients: ${each.key}"
  referenced_security_group_id = each.value
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}
