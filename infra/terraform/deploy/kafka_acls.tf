# What each Kafka user may do: the same list as `chatctl acls` creates on the local stack
# (ctl/src/kafka_admin.rs, docs/security.md). The admin user holds every right, so that
# Terraform and operators keep administering the cluster once MSK refuses everyone without an
# ACL (kafka_acls_enforced).

locals {
  p = var.topic_prefix

  # One entry per (user, resource, operation).
  kafka_acl_list = concat(
    flatten([for id in var.gateway_ids : [
      { user = "gateway-${id}", type = "Topic", name = "${local.p}inbound", pattern = "Literal", ops = ["Write", "Describe"] },
      { user = "gateway-${id}", type = "Topic", name = "${local.p}presence", pattern = "Literal", ops = ["Write", "Read", "Describe"] },
      { user = "gateway-${id}", type = "Topic", name = "${local.p}outbound-${id}", pattern = "Literal", ops = ["Read", "Describe"] },
      { user = "gateway-${id}", type = "Group", name = "${local.p}gateway-${id}", pattern = "Literal", ops = ["Read"] },
    ]]),
    [
      { user = "multiplexer", type = "Topic", name = "${local.p}inbound", pattern = "Literal", ops = ["Read", "Describe"] },
      { user = "multiplexer", type = "Topic", name = "${local.p}presence", pattern = "Literal", ops = ["Read", "Describe"] },
      { user = "multiplexer", type = "Topic", name = "${local.p}inbound-dlq", pattern = "Literal", ops = ["Write", "Describe"] },
      { user = "multiplexer", type = "Topic", name = "${local.p}outbound-", pattern = "Prefixed", ops = ["Write", "Describe"] },
      { user = "multiplexer", type = "Group", name = "${local.p}multiplexer", pattern = "Literal", ops = ["Read"] },
      { user = "data", type = "Topic", name = local.p == "" ? "*" : local.p, pattern = local.p == "" ? "Literal" : "Prefixed", ops = ["Read", "Describe"] },
      { user = "data", type = "Group", name = "${local.p}data-", pattern = "Prefixed", ops = ["Read"] },
      { user = "admin", type = "Cluster", name = "kafka-cluster", pattern = "Literal", ops = ["All"] },
      { user = "admin", type = "Topic", name = "*", pattern = "Literal", ops = ["All"] },
      { user = "admin", type = "Group", name = "*", pattern = "Literal", ops = ["All"] },
    ],
  )

  kafka_acls = {
    for x in flatten([for a in local.kafka_acl_list : [for op in a.ops : merge(a, { op = op })]]) :
    "${x.user} ${x.op} ${x.type} ${x.pattern} ${x.name}" => x
  }
}

resource "kafka_acl" "this" {
  for_each = local.kafka_acls

  acl_principal                = "User:${each.value.user}"
  acl_host                     = "*"
  acl_operation                = each.value.op
  acl_permission_type          = "Allow"
  resource_type                = each.value.type
  resource_name                = each.value.name
  resource_pattern_type_filter = each.value.pattern

  depends_on = [aws_msk_scram_secret_association.this]
}
