#!/usr/bin/env bash
# Usage: kafka-acls.sh [--prefix P] [--gateways gw1,gw2] [--bootstrap HOST:PORT]
#
# Creates the Kafka ACLs of one deployment on the secured local broker (kafka.sh start
# --secure) with `chatctl acls`: each service's user may do what the service needs and nothing
# more (the list: `chatctl acls --print`, from ctl/src/kafka_admin.rs). Runs as the broker's
# admin user, with its CA; the password goes through the environment, never a command line.
# Creating them again is harmless. Prints each ACL.
#
# Env: CHAT_STATE_DIR (default <repo>/.local); CHATCTL, the chatctl binary (default: the newer
#      of target/release/chatctl and target/debug/chatctl; `make build` makes it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

prefix="" gateways="gw1,gw2" bootstrap="127.0.0.1:${KAFKA_SECURE_PORT:-9094}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) prefix="${2?--prefix needs a value}"; shift 2 ;;
    --gateways) gateways="${2?--gateways needs a value}"; shift 2 ;;
    --bootstrap) bootstrap="${2?--bootstrap needs a value}"; shift 2 ;;
    -h|--help) print_help; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done

base="$STATE_DIR/kafka-secure"
[[ -s "$base/users/admin" && -s "$base/tls/ca.crt" ]] \
  || die "no secured broker state in $base: start it first (kafka.sh start --secure)"

chatctl="${CHATCTL:-}"
if [[ -z "$chatctl" ]]; then
  for c in "$REPO_ROOT/target/release/chatctl" "$REPO_ROOT/target/debug/chatctl"; do
    [[ -x "$c" && ( -z "$chatctl" || "$c" -nt "$chatctl" ) ]] && chatctl="$c"
  done
fi
[[ -n "$chatctl" && -x "$chatctl" ]] || die "no chatctl binary: build it first (make build), or say where with CHATCTL"

KAFKA_SASL_PASSWORD="$(cat "$base/users/admin")" \
KAFKA_SECURITY_PROTOCOL=sasl_ssl KAFKA_SASL_MECHANISM=SCRAM-SHA-512 KAFKA_SASL_USERNAME=admin \
KAFKA_CA_FILE="$base/tls/ca.crt" KAFKA_BROKERS="$bootstrap" TOPIC_PREFIX="$prefix" \
  exec "$chatctl" acls --gateways "$gateways"
