terraform {
  # Lifecycle preconditions, startswith() and cross-object validation messages need >= 1.5.
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 5.91 has aws_lb_listener.tcp_idle_timeout_seconds; 6.x is untested with this config.
      version = "~> 5.91"
    }
    kafka = {
      source  = "Mongey/kafka"
      version = "~> 0.12"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }
}
