# The Kafka users: one per service (admin for Terraform and operators, one per gateway, the
# multiplexer, the data team), each a SCRAM secret MSK reads from Secrets Manager. MSK requires
# the secrets' names to start with AmazonMSK_ and a customer-managed KMS key.
#
# Rotation: change a user's password by tainting its random_password and applying; MSK picks up
# the new secret version within minutes, and the tasks get it on their next start (roll the
# service). The old password stops working as soon as MSK has the new one, so roll at once.

locals {
  kafka_users = toset(concat(
    ["admin", "multiplexer", "data"],
    [for id in var.gateway_ids : "gateway-${id}"],
  ))
}

resource "aws_kms_key" "kafka_users" {
  description         = "Encrypts the MSK SCRAM users' secrets of ${var.name}"
  enable_key_rotation = true
}

resource "random_password" "kafka_user" {
  for_each = local.kafka_users

  length  = 40
  special = false
}

resource "aws_secretsmanager_secret" "kafka_user" {
  for_each = local.kafka_users

  name_prefix = "AmazonMSK_${var.name}_${each.key}_"
  description = "SCRAM credentials of the Kafka user ${each.key}: {username, password}"
  kms_key_id  = aws_kms_key.kafka_users.key_id
}

resource "aws_secretsmanager_secret_version" "kafka_user" {
  for_each = local.kafka_users

  secret_id = aws_secretsmanager_secret.kafka_user[each.key].id
  secret_string = jsonencode({
    username = each.key
    password = random_password.kafka_user[each.key].result
  })
}

resource "aws_msk_scram_secret_association" "this" {
  cluster_arn     = aws_msk_cluster.this.arn
  secret_arn_list = [for u in sort(tolist(local.kafka_users)) : aws_secretsmanager_secret.kafka_user[u].arn]

  depends_on = [aws_secretsmanager_secret_version.kafka_user]
}
