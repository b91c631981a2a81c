#!/usr/bin/env bash
# Usage: secure-stack.sh start|stop|status|env
#        secure-stack.sh run ROLE COMMAND [ARGS...]
#
# The secured local stack `make up` runs: the SASL_SSL broker (kafka.sh --secure, 127.0.0.1:9094)
# and the TLS-only Postgres (postgres.sh --secure, 127.0.0.1:54321), each service's Kafka ACLs
# (kafka-acls.sh: `chatctl acls`, so chatctl must be built: `make up` builds first) and Postgres
# roles, and one environment file per role, so that every process connects as its own user over
# TLS with the server's certificate verified, and no password is ever on a command line.
#
#   start   start the broker and Postgres (each makes its CA, certificates, users and roles on
#           first start), create the ACLs of gateways GATEWAY_IDS, write the env files
#   stop    stop the broker and Postgres (state is kept)
#   status  one line each; exit 0 only when both are running and ready
#   env     write the env files again (start does it)
#   run ROLE COMMAND...  run COMMAND with ROLE's env file loaded (exec: same pid), e.g.
#           secure-stack.sh run owner target/release/db-writer migrate
#
# The env files, in <state>/secure/ (mode 600, the dir 700; <state> = <repo>/.local unless
# CHAT_STATE_DIR is set), written from the passwords the broker and Postgres made:
#   gateway-<id>.env  Kafka user gateway-<id>, Postgres chat_reader     (gateways)
#   multiplexer.env   Kafka user multiplexer, Postgres chat_writer, MULTIPLEXER_MIGRATE=false
#   admin.env         Kafka user admin (super user): topics, ACLs and users (chatctl)
#   owner.env         Postgres chat_owner: migrations
#   data.env          Kafka user data (reads every topic), Postgres chat_reader: tail, export
#   replay.env        Kafka user data, Postgres chat_writer: replay (into migrated shards;
#                     shards lacking a migration need owner.env)
# and for the Java and Postgres command-line tools: admin.properties and data.properties
# (kafka-cli.sh ... --command-config), pgpass (PGPASSFILE) with the three roles' passwords.
# The CAs clients trust: <state>/kafka-secure/tls/ca.crt (Kafka), <state>/pg-secure-tls/ca.crt
# (Postgres).
#
# Env: GATEWAY_IDS (default gw1,gw2), TOPIC_PREFIX (default empty), SHARDS (default 4),
#      CHAT_STATE_DIR, and what kafka.sh and postgres.sh read.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GATEWAY_IDS="${GATEWAY_IDS:-gw1,gw2}"
TOPIC_PREFIX="${TOPIC_PREFIX:-}"
SHARDS="${SHARDS:-4}"
KAFKA_ADDR="127.0.0.1:${KAFKA_SECURE_PORT:-9094}"
PG_PORT=54321
ENV_DIR="$STATE_DIR/secure"
KAFKA_STATE="$(mkdir -p "$STATE_DIR" && cd "$STATE_DIR" && pwd -P)/kafka-secure"
KAFKA_CA="$KAFKA_STATE/tls/ca.crt"
PG_CA="$(cd "$STATE_DIR" && pwd -P)/pg-secure-tls/ca.crt"
PG_USERS="$STATE_DIR/pg-secure-users"

kafka_password() { cat "$KAFKA_STATE/users/$1" 2>/dev/null || die "no password for Kafka user $1 in $KAFKA_STATE/users (start the stack first)"; }
pg_password() { cat "$PG_USERS/$1" 2>/dev/null || die "no password for Postgres role $1 in $PG_USERS (start the stack first)"; }

# shard_dsns ROLE: the shards, in order, as ROLE over TLS with the server's name verified.
shard_dsns() {
  local role="$1" pw i out=""
  pw="$(pg_password "$role")"
  for ((i = 0; i < SHARDS; i++)); do
    out+="${out:+,}postgres://$role:$pw@127.0.0.1:$PG_PORT/chat_shard_$i?sslmode=verify-full&sslrootcert=$PG_CA"
  done
  echo "$out"
}

# var NAME VALUE: one line of an env file, single-quoted (bash reads it with `source`).
var() {
  [[ "$2" != *"'"* ]] || die "$1 would hold a single quote: $2"
  printf "%s='%s'\n" "$1" "$2"
}

# kafka_vars USER: the settings of a Kafka client signing in as USER.
kafka_vars() {
  var KAFKA_BROKERS "$KAFKA_ADDR"
  var KAFKA_SECURITY_PROTOCOL sasl_ssl
  var KAFKA_CA_FILE "$KAFKA_CA"
  var KAFKA_SASL_MECHANISM SCRAM-SHA-512
  var KAFKA_SASL_USERNAME "$1"
  var KAFKA_SASL_PASSWORD "$(kafka_password "$1")"
}
pg_vars() { var SHARD_DSNS "$(shard_dsns "$1")"; }

# write_private FILE: stdin into FILE, readable by its owner only, replaced whole.
write_private() {
  local tmp="$1.tmp"
  (umask 077 && cat >"$tmp")
  mv -f "$tmp" "$1"
}

write_env() {
  local id
  mkdir -p "$ENV_DIR"
  chmod 700 "$ENV_DIR"
  local header="# Written by infra/scripts/secure-stack.sh on every start; edits are overwritten."
  IFS=',' read -ra ids <<<"$GATEWAY_IDS"
  for id in "${ids[@]}"; do
    { echo "$header"; kafka_vars "gateway-$id"; pg_vars chat_reader; } | write_private "$ENV_DIR/gateway-$id.env"
  done
  { echo "$header"; kafka_vars multiplexer; pg_vars chat_writer; var MULTIPLEXER_MIGRATE false; } \
    | write_private "$ENV_DIR/multiplexer.env"
  { echo "$header"; kafka_vars admin; } | write_private "$ENV_DIR/admin.env"
  { echo "$header"; pg_vars chat_owner; } | write_private "$ENV_DIR/owner.env"
  { echo "$header"; kafka_vars data; pg_vars chat_reader; } | write_private "$ENV_DIR/data.env"
  { echo "$header"; kafka_vars data; pg_vars chat_writer; } | write_private "$ENV_DIR/replay.env"
  local user
  for user in admin data; do
    write_private "$ENV_DIR/$user.properties" <<EOF
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$user" password="$(kafka_password "$user")";
ssl.truststore.type=PEM
ssl.truststore.location=$KAFKA_CA
EOF
  done
  local role
  for role in chat_owner chat_writer chat_reader; do
    echo "127.0.0.1:$PG_PORT:*:$role:$(pg_password "$role")"
  done | write_private "$ENV_DIR/pgpass"
}

start() {
  "$INFRA_SCRIPTS_DIR/kafka.sh" start --secure
  SHARDS="$SHARDS" "$INFRA_SCRIPTS_DIR/postgres.sh" start --secure
  mkdir -p "$ENV_DIR"
  chmod 700 "$ENV_DIR"
  "$INFRA_SCRIPTS_DIR/kafka-acls.sh" --prefix "$TOPIC_PREFIX" --gateways "$GATEWAY_IDS" >"$ENV_DIR/acls.log" 2>&1 \
    || { tail_log "$ENV_DIR/acls.log"; die "creating the Kafka ACLs failed (see $ENV_DIR/acls.log)"; }
  write_env
}

stop() {
  "$INFRA_SCRIPTS_DIR/kafka.sh" stop --secure
  "$INFRA_SCRIPTS_DIR/postgres.sh" stop --secure
}

status() {
  local rc=0
  "$INFRA_SCRIPTS_DIR/kafka.sh" status --secure || rc=1
  "$INFRA_SCRIPTS_DIR/postgres.sh" status --secure || rc=1
  return $rc
}

# run ROLE COMMAND...: the env file's variables exported, then exec (its pid stays the caller's).
run() {
  local role="${1:-}"
  [[ -n "$role" && $# -ge 2 ]] || die "run needs a role and a command"
  shift
  local f="$ENV_DIR/$role.env"
  [[ -r "$f" ]] || die "$f is missing: start the secured stack first (make up)"
  set -a
  # shellcheck disable=SC1090
  source "$f"
  set +a
  exec "$@"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) write_env ;;
  run) shift; run "$@" ;;
  -h|--help) print_help ;;
  *) print_help >&2; exit 2 ;;
esac
