provider "aws" {
  region = var.aws_region

  default_tags {
    tags = merge({ "app" = var.name, "managed-by" = "terraform" }, var.tags)
  }
}

# The Kafka provider talks to the brokers directly (Kafka admin API), from the machine that runs
# Terraform: that machine must reach the MSK brokers (VPN or bastion in kafka_admin_cidr_blocks).
# It signs in as the admin user over TLS (the brokers' certificates are Amazon's, in the
# system's roots).
provider "kafka" {
  bootstrap_servers = split(",", aws_msk_cluster.this.bootstrap_brokers_sasl_scram)
  tls_enabled       = true
  sasl_mechanism    = "scram-sha512"
  sasl_username     = "admin"
  sasl_password     = random_password.kafka_user["admin"].result
  timeout           = 120
}
