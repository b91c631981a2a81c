# Layer-4 load balancer in front of the gateways. Websockets are long-lived TCP flows: the NLB
# passes them through (or terminates TLS on 443 when a certificate is given) and keeps idle
# flows open for nlb_tcp_idle_timeout_seconds on TCP listeners.

locals {
  tls_on_443 = var.certificate_arn != null
}

resource "aws_lb" "gateway" {
  name               = "${var.name}-gw"
  load_balancer_type = "network"
  internal           = false
  subnets            = aws_subnet.public[*].id
  security_groups    = [aws_security_group.nlb.id]

  enable_cross_zone_load_balancing = true
}

resource "aws_lb_target_group" "gateway" {
  name        = "${var.name}-gw"
  port        = 8080
  protocol    = "TCP"
  target_type = "ip"
  vpc_id      = aws_vpc.this.id

  # On deregistration (deploy, scale-in) wait for the gateway to close its sockets with 1001,
  # then cut what is left so clients reconnect to another gateway and sync.
  deregistration_delay   = 30
  connection_termination = true

  # /readyz is served on the gateways' operations port (GATEWAY_METRICS_ADDR), never on the
  # traffic port the NLB forwards.
  health_check {
    protocol            = "HTTP"
    path                = "/readyz"
    port                = "9100"
    interval            = 10
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }
}

resource "aws_lb_listener" "gateway_443" {
  load_balancer_arn = aws_lb.gateway.arn
  port              = 443
  protocol          = local.tls_on_443 ? "TLS" : "TCP"
  certificate_arn   = var.certificate_arn
  ssl_policy        = local.tls_on_443 ? "ELBSecurityPolicy-TLS13-1-2-2021-06" : null

  # Settable on TCP listeners only; a TLS listener's idle timeout is fixed at 350 s.
  tcp_idle_timeout_seconds = local.tls_on_443 ? null : var.nlb_tcp_idle_timeout_seconds

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.gateway.arn
  }
}

resource "aws_lb_listener" "gateway_8080" {
  count = var.enable_plaintext_listener ? 1 : 0

  load_balancer_arn        = aws_lb.gateway.arn
  port                     = 8080
  protocol                 = "TCP"
  tcp_idle_timeout_seconds = var.nlb_tcp_idle_timeout_seconds

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.gateway.arn
  }
}
