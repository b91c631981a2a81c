#!/usr/bin/env bash
# Usage: kafka-acls.sh [--prefix P] [--gateways gw1,gw2] [--bootstrap HOST:PORT]
#
# Creates the Kafka ACLs of one deployment on the secured local broker (kafka.sh start
# --secure): each service's user may do what the service needs and nothing more (the list is
# in infra/kafka/Acls.java). Runs as the broker's admin user, with its CA. Creating them again
# is harmless. Prints each ACL.
#
# Env: CHAT_STATE_DIR (default <repo>/.local), KAFKA_HOME (as kafka.sh).
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
if [[ -n "${KAFKA_HOME:-}" && -d "${KAFKA_HOME}/libs" ]]; then libs="$KAFKA_HOME/libs"; else libs="$STATE_DIR/kafka-dist/libs"; fi
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

props="$(mktemp)"
trap 'rm -f "$props"' EXIT
chmod 600 "$props"
cat >"$props" <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(cat "$base/users/admin")";
ssl.truststore.type=PEM
ssl.truststore.location=$base/tls/ca.crt
PROPS

"$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 \
  -Dlog4j2.configurationFile="$INFRA_DIR/kafka/tools-log4j2.properties" \
  -cp "$libs/*" "$INFRA_DIR/kafka/Acls.java" "$bootstrap" "$props" "$prefix" "$gateways"
