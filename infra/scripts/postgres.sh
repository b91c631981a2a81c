#!/usr/bin/env bash
# Usage: postgres.sh start|stop|status|reset|url [--name NAME] [--port PORT] [--secure]
#
# Local PostgreSQL instance for dev/tests (defaults: --name pg --port 54320).
#   start   initdb on first use, start, wait for pg_isready, then make sure the
#           superuser role `chat` and databases chat_shard_0..chat_shard_{SHARDS-1}
#           exist. Already running: only the role/database check is done.
#   stop    fast shutdown (pg_ctl -m fast), waits for exit
#   status  one line; exit 0 when running, 3 when stopped
#   reset   stop and delete the instance (data, log, socket)
#   url     print postgres://chat@127.0.0.1:PORT/chat_shard_0
# Clients connect as  postgres://chat@127.0.0.1:54320/chat_shard_N  (trust auth,
# dev only) or via the unix socket in the instance dir (psql -h <instance dir>).
#
# --secure (defaults --name pg-secure --port 54321): TLS only over TCP (ssl = on; pg_hba
#   takes hostssl with scram-sha-256 and rejects everything else on 127.0.0.1), no
#   superuser over TCP, and three roles with random passwords (<state>/<name>-users/<role>):
#     chat_owner   owns the shard databases and runs migrations (CREATEDB, for tests);
#     chat_writer  reads and writes rows (the multiplexer, a replay);
#     chat_reader  reads (the gateway: history, sync, the conversation list).
#   In every shard database the owner's default privileges grant the others their part of
#   every table the migrations create. The server's certificate is signed by a CA made on
#   first start: <state>/<name>-tls/ca.crt is what clients trust (SHARD_CA_FILE).
#
# Where the instance lives (instance dir = data/, postgres.log, unix socket):
#   <state>/<name>/  (state = <repo>/.local)   when the server's OS user can
#       traverse every path component and the socket path fits in 107 bytes;
#   /tmp/chat-pg-<sha1(state dir)[0:12]>/<name>/   otherwise (e.g. repo under
#       /root, mode 0700). No permissions of parent dirs are ever changed.
#       <state>/<name>.location then records the chosen dir. An existing
#       instance is always found again at whichever of the two places it is.
# The server runs as the `postgres` OS user when invoked as root (initdb and
# pg_ctl refuse root), else as the invoking user.
#
# Env:
#   SHARDS          number of chat_shard_N databases (default 4)
#   PG_BINDIR       dir with initdb/pg_ctl/postgres (default: newest
#                   /usr/lib/postgresql/*/bin)
#   CHAT_STATE_DIR  state dir (default <repo>/.local)
#   PG_START_TIMEOUT seconds (default 60)
#   PG_STAT_STATEMENTS  1: load pg_stat_statements, planning time included (what
#                   bench/ab.sh --statements reads); read at each start
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { print_help | sed -n 1p >&2; exit 2; }

cmd="" name="" port="" secure=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --secure) secure=1; shift ;;
    --name) [[ $# -ge 2 ]] || usage; name="$2"; shift 2 ;;
    --name=*) name="${1#*=}"; shift ;;
    --port) [[ $# -ge 2 ]] || usage; port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    -h|--help) print_help; exit 0 ;;
    -*) die "unknown option '$1'" ;;
    *) [[ -z "$cmd" ]] || die "unexpected argument '$1'"; cmd="$1"; shift ;;
  esac
done
[[ -n "$cmd" ]] || usage
if [[ $secure -eq 1 ]]; then name="${name:-pg-secure}"; port="${port:-54321}"; else name="${name:-pg}"; port="${port:-54320}"; fi
[[ "$name" =~ ^[A-Za-z0-9_-]+$ ]] || die "invalid --name '$name' (letters, digits, _ and - only)"
if ! [[ "$port" =~ ^[1-9][0-9]{0,4}$ ]] || ((port > 65535)); then die "invalid --port '$port'"; fi
SHARDS="${SHARDS:-4}"
[[ "$SHARDS" =~ ^[0-9]+$ ]] || die "SHARDS must be a number, got '$SHARDS'"
START_TIMEOUT="${PG_START_TIMEOUT:-60}"

if [[ "$cmd" == url ]]; then
  echo "postgres://chat@127.0.0.1:$port/chat_shard_0"
  exit 0
fi

# ---- binaries ---------------------------------------------------------------
find_bindir() {
  if [[ -n "${PG_BINDIR:-}" ]]; then echo "$PG_BINDIR"; return 0; fi
  local d
  d="$(printf '%s\n' /usr/lib/postgresql/*/bin | grep -v '\*' | sort -V | tail -n1)"
  [[ -n "$d" ]] && echo "$d"
}
if [[ "$cmd" == start ]]; then
  "$INFRA_SCRIPTS_DIR/install-deps.sh" postgres
fi
BIN="$(find_bindir || true)"
[[ -n "$BIN" && -x "$BIN/pg_ctl" && -x "$BIN/initdb" ]] \
  || die "PostgreSQL server binaries not found (run infra/scripts/install-deps.sh postgres or set PG_BINDIR)"
PSQL="$BIN/psql"; [[ -x "$PSQL" ]] || PSQL="$(command -v psql || true)"
PG_ISREADY="$BIN/pg_isready"; [[ -x "$PG_ISREADY" ]] || PG_ISREADY="$(command -v pg_isready || true)"

# ---- OS user ----------------------------------------------------------------
if [[ $(id -u) -eq 0 ]]; then
  PG_USER=postgres
  id -u "$PG_USER" >/dev/null 2>&1 || die "OS user 'postgres' does not exist (apt-get install postgresql creates it)"
else
  PG_USER="$(id -un)"
fi
as_pg() { # run a command as the server's OS user, from a dir it can read
  if [[ "$(id -un)" == "$PG_USER" ]]; then
    (cd / && "$@")
  else
    (cd / && runuser -u "$PG_USER" -- "$@")
  fi
}
pg_can_use() { # dir -> 0 when PG_USER can enter and write it
  as_pg test -d "$1" -a -x "$1" -a -w "$1" 2>/dev/null
}

# ---- instance location (see header) ------------------------------------------
PRIMARY="$STATE_DIR/$name"
FALLBACK="/tmp/chat-pg-$(printf '%s' "$(mkdir -p "$STATE_DIR" && cd "$STATE_DIR" && pwd -P)" | sha1sum | cut -c1-12)/$name"
LOCATION_FILE="$STATE_DIR/$name.location"

sock_fits() { (( ${#1} + ${#port} + 10 <= 107 )); }   # "$dir/.s.PGSQL.$port"

resolve_instance() {
  if [[ -f "$PRIMARY/data/PG_VERSION" ]]; then echo "$PRIMARY"; return; fi
  if [[ -f "$FALLBACK/data/PG_VERSION" ]]; then echo "$FALLBACK"; return; fi
  [[ "$cmd" == start ]] || { echo ""; return; }   # nothing to stop/show
  if sock_fits "$PRIMARY"; then
    mkdir -p "$PRIMARY"
    [[ "$PG_USER" == "$(id -un)" ]] || chown "$PG_USER:" "$PRIMARY"
    chmod 0755 "$PRIMARY"
    if pg_can_use "$PRIMARY"; then echo "$PRIMARY"; return; fi
    rmdir "$PRIMARY" 2>/dev/null || true
  fi
  echo "$FALLBACK"
}

INST="$(resolve_instance)"
DATA="${INST:+$INST/data}"
LOG="${INST:+$INST/postgres.log}"

prepare_fallback_root() {
  local root
  root="$(dirname "$FALLBACK")"
  mkdir -p "$root" "$FALLBACK"
  # refuse a dir planted by someone else in /tmp
  [[ "$(stat -c %u "$root")" == "$(id -u)" ]] || die "$root is owned by another user; remove it"
  chmod 0755 "$root"
  [[ "$PG_USER" == "$(id -un)" ]] || chown "$PG_USER:" "$FALLBACK"
  chmod 0755 "$FALLBACK"
  pg_can_use "$FALLBACK" || die "$PG_USER cannot use $FALLBACK"
  echo "$FALLBACK" >"$LOCATION_FILE"
}

is_running() { [[ -n "$DATA" && -f "$DATA/PG_VERSION" ]] && as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }
running_port() { sed -n '4p' "$DATA/postmaster.pid" 2>/dev/null || true; }
running_pid() { sed -n '1p' "$DATA/postmaster.pid" 2>/dev/null || true; }

# ---- the secured instance's certificate and roles ------------------------------
TLS_DIR="$STATE_DIR/$name-tls"
USERS_DIR="$STATE_DIR/$name-users"
SECURE_ROLES=(chat_owner chat_writer chat_reader)
secure_prepare() {
  local r
  mkdir -p "$TLS_DIR" "$USERS_DIR"
  chmod 700 "$USERS_DIR"
  for r in "${SECURE_ROLES[@]}"; do
    [[ -s "$USERS_DIR/$r" ]] || head -c 18 /dev/urandom | base64 | tr '+/' '-_' >"$USERS_DIR/$r"
  done
  if [[ ! -s "$TLS_DIR/server.crt" ]]; then
    command -v openssl >/dev/null 2>&1 || die "openssl is needed to make the secured server's certificate"
    (
      cd "$TLS_DIR"
      openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=chat local Postgres CA" \
        -keyout ca.key -out ca.crt
      openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr
      printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >server.ext
      openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile server.ext -out server.crt.tmp
      mv server.crt.tmp server.crt
      rm -f server.csr server.ext ca.srl
    ) >"$STATE_DIR/$name-tls.log" 2>&1 || die "making the secured server's certificate failed (see $STATE_DIR/$name-tls.log)"
  fi
  # The server reads its key as its own OS user, and only from a file no one else can read.
  as_pg tee "$DATA/server.crt" <"$TLS_DIR/server.crt" >/dev/null
  as_pg tee "$DATA/server.key" <"$TLS_DIR/server.key" >/dev/null
  as_pg chmod 600 "$DATA/server.key"
}

write_conf() {
  local sockdir="${INST//\'/\'\'}"
  as_pg tee "$DATA/chat.conf" >/dev/null <<EOF
# Generated by infra/scripts/postgres.sh on every start; edits are overwritten.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$sockdir'
max_connections = 300
shared_buffers = 128MB
# The shards' working set is in memory and on SSD: a random page read costs about a sequential
# one, and with the default (4) the planner scans whole tables instead of probing an index.
random_page_cost = 1.1
fsync = on
synchronous_commit = on
# Group commit: a commit waits up to 0.5 ms for others to share its WAL flush when another
# transaction is active. The writers' commits (store, user index, ack) queue behind one flush at
# a time; sharing them cut flush time a message by a third and receipt p99 by 0.63-0.85x in four
# A/Bs (docs/performance-log.md, 2026-12-04).
commit_delay = 500
commit_siblings = 1
full_page_writes = on
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
EOF
  if [[ "${PG_STAT_STATEMENTS:-0}" == 1 ]]; then
    as_pg tee -a "$DATA/chat.conf" >/dev/null <<'EOF'
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track_planning = on
EOF
  fi
  if [[ $secure -eq 1 ]]; then
    as_pg tee -a "$DATA/chat.conf" >/dev/null <<'EOF'
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_min_protocol_version = 'TLSv1.2'
password_encryption = 'scram-sha-256'
EOF
    as_pg tee "$DATA/pg_hba.conf" >/dev/null <<'EOF'
# Generated by infra/scripts/postgres.sh --secure. Over TCP: TLS and a password, or nothing.
# The unix socket (in the instance dir, for the server's OS user and root) administers it.
# TYPE   DATABASE  USER  ADDRESS        METHOD
local    all       all                  trust
hostssl  all       chat_owner,chat_writer,chat_reader  127.0.0.1/32  scram-sha-256
host     all       all   127.0.0.1/32   reject
EOF
    return 0
  fi
  as_pg tee "$DATA/pg_hba.conf" >/dev/null <<'EOF'
# Generated by infra/scripts/postgres.sh. DEV ONLY: trust, loopback only.
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  trust
host    all          all   127.0.0.1/32   trust
local   replication  all                  trust
host    replication  all   127.0.0.1/32   trust
EOF
}

init_if_needed() {
  [[ -f "$DATA/PG_VERSION" ]] && return 0
  local tmp="$INST/data.init"
  as_pg rm -rf "$tmp"
  if ! as_pg "$BIN/initdb" -D "$tmp" -U postgres --auth=trust -E UTF8 --no-locale >"$STATE_DIR/$name.initdb.log" 2>&1; then
    die "initdb failed (see $STATE_DIR/$name.initdb.log)"
  fi
  echo "include_if_exists = 'chat.conf'" | as_pg tee -a "$tmp/postgresql.conf" >/dev/null
  as_pg mv "$tmp" "$DATA"
}

# The secured instance's roles and shard databases, with each role's part of what the owner's
# migrations will create (default privileges, set per database).
ensure_secure_objects() {
  local out r d i
  local sql="" 
  for r in "${SECURE_ROLES[@]}"; do
    sql+="SELECT format('CREATE ROLE %I LOGIN', '$r') WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$r') \\gexec
ALTER ROLE $r LOGIN PASSWORD '$(cat "$USERS_DIR/$r")';
"
  done
  # The owner is a member of the others, so that dropping a database it owns (tests do, with
  # FORCE) may end their sessions in it; it gains nothing else: it owns every table already.
  sql+="ALTER ROLE chat_owner CREATEDB;
GRANT chat_writer, chat_reader TO chat_owner;
SELECT format('CREATE DATABASE %I OWNER chat_owner', d)
  FROM (SELECT 'chat_shard_' || i AS d FROM generate_series(0, $SHARDS - 1) AS i) s
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = s.d) \\gexec
"
  out="$(printf '%s' "$sql" | "$PSQL" -X -q -v ON_ERROR_STOP=1 -h "$INST" -p "$port" -U postgres -d postgres 2>&1)" \
    || die "creating roles/databases failed: $(echo "$out" | tr '\n' ' ')"
  for ((i = 0; i < SHARDS; i++)); do
    d="chat_shard_$i"
    out="$("$PSQL" -X -q -v ON_ERROR_STOP=1 -h "$INST" -p "$port" -U postgres -d "$d" 2>&1 <<EOF
$(default_privileges_sql)
EOF
    )" || die "granting in $d failed: $(echo "$out" | tr '\n' ' ')"
  done
}

# What a shard database's owner grants the writer and the reader, now and for every table and
# sequence its migrations create later. Printed so that tests making their own databases run
# the same statements (as chat_owner): postgres.sh grants-sql --secure.
default_privileges_sql() {
  cat <<'EOF'
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO chat_writer;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO chat_writer;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO chat_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE chat_owner IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO chat_writer;
ALTER DEFAULT PRIVILEGES FOR ROLE chat_owner IN SCHEMA public
  GRANT USAGE, SELECT ON SEQUENCES TO chat_writer;
ALTER DEFAULT PRIVILEGES FOR ROLE chat_owner IN SCHEMA public
  GRANT SELECT ON TABLES TO chat_reader;
EOF
}

ensure_db_objects() {
  local out
  if [[ $secure -eq 1 ]]; then ensure_secure_objects; return; fi
  if ! out="$("$PSQL" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres 2>&1 <<EOF
SELECT 'CREATE ROLE chat LOGIN SUPERUSER'
  WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'chat') \gexec
SELECT 'ALTER ROLE chat LOGIN SUPERUSER'
  WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'chat' AND NOT (rolsuper AND rolcanlogin)) \gexec
SELECT format('CREATE DATABASE %I OWNER chat', d)
  FROM (SELECT 'chat_shard_' || i AS d FROM generate_series(0, $SHARDS - 1) AS i) s
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = s.d) \gexec
EOF
  )"; then
    die "creating role/databases failed: $(echo "$out" | tr '\n' ' ')"
  fi
}

lock() {
  mkdir -p "$STATE_DIR"
  exec 9>"$STATE_DIR/.$name.pg.lock"
  # pg_ctl start gets 9>&- so the postmaster never holds this lock; the
  # timeout is a backstop against anything else that leaked it
  flock -w 300 9 || die "another postgres.sh holds $STATE_DIR/.$name.pg.lock for 300s; giving up"
}

case "$cmd" in
  start)
    lock
    [[ "$INST" == "$FALLBACK" ]] && prepare_fallback_root
    init_if_needed
    if is_running; then
      rp="$(running_port)"
      [[ "$rp" == "$port" ]] || die "$name is already running on port $rp (asked for $port); stop it first"
    else
      port_open 127.0.0.1 "$port" && die "port 127.0.0.1:$port is already in use by another process"
      [[ $secure -eq 1 ]] && secure_prepare
      write_conf
      # 9>&-: the postmaster must not inherit (and hold) our lock fd
      if ! as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t "$START_TIMEOUT" -s start >/dev/null 2>&1 9>&-; then
        tail_log "$LOG" 30
        die "$name failed to start (see $LOG)"
      fi
    fi
    deadline=$((SECONDS + START_TIMEOUT))
    until "$PG_ISREADY" -q -h 127.0.0.1 -p "$port" -d postgres; do
      if ((SECONDS >= deadline)); then tail_log "$LOG" 30; die "$name not ready after ${START_TIMEOUT}s (see $LOG)"; fi
      sleep 0.2
    done
    ensure_db_objects
    ;;
  stop)
    lock
    if is_running; then
      as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 -s stop >/dev/null 2>&1 \
        || { tail_log "$LOG" 20; die "$name did not stop (see $LOG)"; }
    fi
    ;;
  status)
    if is_running; then
      echo "$name: running pid $(running_pid), 127.0.0.1:$(running_port), data $DATA"
    else
      echo "$name: stopped${DATA:+ (data $DATA)}"
      exit 3
    fi
    ;;
  reset)
    lock
    if is_running; then
      as_pg "$BIN/pg_ctl" -D "$DATA" -m immediate -w -t 60 -s stop >/dev/null 2>&1 || die "$name did not stop"
    fi
    [[ -n "$INST" ]] && rm -rf "$INST"
    rm -f "$LOCATION_FILE" "$STATE_DIR/$name.initdb.log"
    ;;
  grants-sql)
    default_privileges_sql
    ;;
  *) usage ;;
esac
