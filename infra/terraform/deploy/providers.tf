provider "aws" {
  region = var.aws_region

  default_tags {
    tags = merge({ "app" = var.name, "managed-by" = "terraform" }, var.tags)
  }
}

# The Kafka provider talks to the brokers directly (Kafka admin API), from the machine that runs
# Terraform: that machine must reach the MSK brokers (VPN or bastion in kafka_admin_cidr_blocks).
# The brokers speak PLAINTEXT because the Rust clients set no security.protocol (see README).
provider "kafka" {
  bootstrap_servers = split(",", aws_msk_cluster.this.bootstrap_brokers)
  tls_enabled       = false
  timeout           = 120
}
