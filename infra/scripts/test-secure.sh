#!/usr/bin/env bash
# Usage: test-secure.sh [cargo test arguments...]   (what `make test-secure` runs)
#        test-secure.sh stop
#
# The integration tests (chat-e2e) against a secured broker and Postgres of their own: SASL_SSL
# with SCRAM on 127.0.0.1:9194 (controller 9195, ACLs enforced) and a Postgres that takes only
# TLS with scram-sha-256 over TCP on 127.0.0.1:54421, their state (a local CA, the users'
# passwords) in <state>/test-secure/. Both are started here when not running and left running
# (`test-secure.sh stop` stops them); they are separate from `make stack` (9092, 54320) and from
# the secured instances `make up` and the security tests use (9094, 54321).
#
# The tests set up and inspect as the broker's admin user and the shards' owner role; the
# gateways and multiplexers they start sign in as their own: `gateway-<id>` and `chat_reader`,
# `multiplexer` and `chat_writer` (not migrating), under the ACLs `chatctl acls` creates for each
# test's topic prefix and the grants of `db-writer roles`, as `make up` runs them. Every
# connection verifies the server's certificate against its CA (`sslmode=verify-full`). What the
# roles and the ACLs refuse is what e2e/tests/postgres_security.rs, postgres_roles.rs and
# kafka_security.rs check.
#
# Env: CHAT_STATE_DIR (default <repo>/.local), KAFKA_HOME (default <state>/kafka-dist).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

base="$STATE_DIR/test-secure"
kafka_home="${KAFKA_HOME:-$STATE_DIR/kafka-dist}"
kafka_port=9194 controller_port=9195 pg_port=54421

instances() {
  CHAT_STATE_DIR="$base" KAFKA_HOME="$kafka_home" KAFKA_SECURE_PORT=$kafka_port \
    KAFKA_SECURE_CONTROLLER_PORT=$controller_port "$INFRA_SCRIPTS_DIR/kafka.sh" "$1" --secure
  CHAT_STATE_DIR="$base" "$INFRA_SCRIPTS_DIR/postgres.sh" "$1" --secure --port $pg_port
}

if [[ "${1:-}" == stop ]]; then
  instances stop
  exit 0
fi

mkdir -p "$base"
instances start

kafka_ca="$base/kafka-secure/tls/ca.crt"
pg_ca="$base/pg-secure-tls/ca.crt"
[[ -s "$kafka_ca" && -s "$pg_ca" ]] || die "the secured instances left no CA in $base"
export CHAT_TEST_BROKERS="127.0.0.1:$kafka_port"
export KAFKA_SECURITY_PROTOCOL=sasl_ssl KAFKA_CA_FILE="$kafka_ca" KAFKA_SASL_USERNAME=admin
KAFKA_SASL_PASSWORD="$(cat "$base/kafka-secure/users/admin")"
export KAFKA_SASL_PASSWORD
CHAT_TEST_PG="postgres://chat_owner:$(cat "$base/pg-secure-users/chat_owner")@127.0.0.1:$pg_port/postgres?sslmode=verify-full&sslrootcert=$pg_ca"
export CHAT_TEST_PG
# Where the services' own passwords are: the gateways and multiplexers the tests start sign in
# with them, each as its own Kafka user and Postgres role (e2e/src/lib.rs, `Identities`).
export CHAT_TEST_KAFKA_USERS="$base/kafka-secure/users" CHAT_TEST_PG_ROLES="$base/pg-secure-users"
# Where the broker and Postgres keep their data: the delete-on-ack canary test
# (e2e/tests/shredding.rs) scans both byte for byte.
export CHAT_TEST_KAFKA_DATA="$base/kafka-secure/data"
CHAT_TEST_PG_DATA="$(CHAT_STATE_DIR="$base" "$INFRA_SCRIPTS_DIR/postgres.sh" status --secure --port $pg_port \
  | sed -n 's/.*, data \(.*\)$/\1/p')"
[[ -d "$CHAT_TEST_PG_DATA" ]] || die "cannot tell where the test Postgres keeps its data"
export CHAT_TEST_PG_DATA
echo "test-secure: chat-e2e against SASL_SSL 127.0.0.1:$kafka_port and TLS Postgres 127.0.0.1:$pg_port (verify-full)"
cd "$REPO_ROOT"
exec cargo test -p chat-e2e "$@"
