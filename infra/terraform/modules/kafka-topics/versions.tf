terraform {
  # startswith() needs 1.3; lifecycle preconditions need 1.2.
  required_version = ">= 1.5.0"

  required_providers {
    kafka = {
      source  = "Mongey/kafka"
      version = "~> 0.12"
    }
  }
}
