#!/usr/bin/env bash
# Usage: services.sh start|stop|status|logs
#
# The application processes of the local stack: gateways gw1 (:8080, operations :9100) and gw2
# (:8081, operations :9101) and one multiplexer (:9300), started from target/$PROFILE (default release) with pid files under
# <state>/run and logs under <state>/logs (<state> = <repo>/.local unless CHAT_STATE_DIR is set).
# `start` returns once each answers /readyz (a gateway's on its operations port); processes already running are left alone. `stop`
# sends SIGTERM (graceful drain) and waits. `status` prints one line each; exit 0 only when all
# are ready. `logs` follows the logs there are (exit 1 at once when there are none).
#
# With CHAT_ENV_DIR set (`make up` sets it to <state>/secure, written by secure-stack.sh), each
# process first loads its own env file there: gateway-<id>.env for a gateway, multiplexer.env for
# the multiplexer (its Kafka user and password, its Postgres role's DSNs, the CAs), so that no
# credential is on a command line. Without it the processes use the plaintext stack's defaults.
#
# Env: PROFILE (release|debug), CHAT_STATE_DIR, CHAT_ENV_DIR, RETENTION (keep|delete-on-ack),
#      KAFKA_BROKERS, SHARD_DSNS, JWT_SECRET; see docs/configuration.md for every variable the
#      processes read.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PROFILE="${PROFILE:-release}"
BIN="$REPO_ROOT/target/$PROFILE"
RUN="$STATE_DIR/run"
LOGS="$STATE_DIR/logs"

# name  binary  health-url  env...
SERVICES=(
  "gw1|gateway|http://127.0.0.1:9100/readyz|GATEWAY_ID=gw1 GATEWAY_ADDR=127.0.0.1:8080 GATEWAY_METRICS_ADDR=127.0.0.1:9100 DEV_TOKENS=true"
  "gw2|gateway|http://127.0.0.1:9101/readyz|GATEWAY_ID=gw2 GATEWAY_ADDR=127.0.0.1:8081 GATEWAY_METRICS_ADDR=127.0.0.1:9101 DEV_TOKENS=true"
  "multiplexer|multiplexer|http://127.0.0.1:9300/readyz|MULTIPLEXER_HTTP_ADDR=127.0.0.1:9300"
)

running() { local f="$RUN/$1.pid"; [[ -f "$f" ]] && pid_alive "$(cat "$f")"; }

# env_file NAME BINARY: the env file of a service under CHAT_ENV_DIR, named after its user.
env_file() { if [[ "$2" == gateway ]]; then echo "$CHAT_ENV_DIR/gateway-$1.env"; else echo "$CHAT_ENV_DIR/$1.env"; fi; }

# launch NAME BINARY ENVS: the process in the background, its env file loaded first (if any);
# prints its pid (the subshell execs, so the pid is the service's).
launch() {
  local name="$1" bin="$2" envs="$3" file=""
  if [[ -n "${CHAT_ENV_DIR:-}" ]]; then
    file="$(env_file "$name" "$bin")"
    [[ -r "$file" ]] || die "$file is missing (infra/scripts/secure-stack.sh start writes it)"
  fi
  (
    if [[ -n "$file" ]]; then
      set -a
      # shellcheck disable=SC1090
      source "$file"
      set +a
    fi
    # shellcheck disable=SC2086
    exec env $envs nohup "$BIN/$bin"
  ) >>"$LOGS/$name.log" 2>&1 &
  echo $!
}

ready() { curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; }

start() {
  local entry name bin url envs
  mkdir -p "$RUN" "$LOGS"
  for entry in "${SERVICES[@]}"; do
    IFS='|' read -r name bin url envs <<<"$entry"
    [[ -x "$BIN/$bin" ]] || die "$BIN/$bin is missing: build first (make build)"
    if running "$name"; then continue; fi
    launch "$name" "$bin" "$envs" >"$RUN/$name.pid"
  done
  for entry in "${SERVICES[@]}"; do
    IFS='|' read -r name bin url envs <<<"$entry"
    local deadline=$((SECONDS + 60))
    until ready "$url"; do
      if ! running "$name"; then tail_log "$LOGS/$name.log"; die "$name exited during start-up"; fi
      if ((SECONDS > deadline)); then tail_log "$LOGS/$name.log"; die "$name not ready after 60 s"; fi
      sleep 0.3
    done
  done
}

stop() {
  local entry name pid
  for entry in "${SERVICES[@]}"; do
    IFS='|' read -r name _ <<<"$entry"
    running "$name" || { rm -f "$RUN/$name.pid"; continue; }
    pid="$(cat "$RUN/$name.pid")"
    kill -TERM "$pid" 2>/dev/null || true
  done
  for entry in "${SERVICES[@]}"; do
    IFS='|' read -r name _ <<<"$entry"
    [[ -f "$RUN/$name.pid" ]] || continue
    pid="$(cat "$RUN/$name.pid")"
    local deadline=$((SECONDS + 30))
    while pid_alive "$pid"; do
      if ((SECONDS > deadline)); then kill -KILL "$pid" 2>/dev/null || true; fi
      sleep 0.2
    done
    rm -f "$RUN/$name.pid"
  done
}

status() {
  local entry name bin url rc=0
  for entry in "${SERVICES[@]}"; do
    IFS='|' read -r name bin url _ <<<"$entry"
    if running "$name" && ready "$url"; then echo "$name: ready (pid $(cat "$RUN/$name.pid"))"
    elif running "$name"; then echo "$name: running, not ready"; rc=1
    else echo "$name: stopped"; rc=3; fi
  done
  return $rc
}

# Follows the logs of the services that have one; says which have none. With none at all there
# is nothing to follow: exit 1 rather than wait for files that may never appear.
logs() {
  local entry name present=() missing=()
  for entry in "${SERVICES[@]}"; do
    IFS='|' read -r name _ <<<"$entry"
    if [[ -f "$LOGS/$name.log" ]]; then present+=("$LOGS/$name.log"); else missing+=("$name"); fi
  done
  if ((${#present[@]} == 0)); then
    die "no logs in $LOGS for ${missing[*]}: nothing to follow (make up starts them; CHAT_STATE_DIR selects the state dir)"
  fi
  if ((${#missing[@]} > 0)); then
    echo "$SCRIPT_NAME: no log yet for ${missing[*]} in $LOGS; following the others" >&2
  fi
  exec tail -n 50 -F "${present[@]}"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  logs) logs ;;
  *) print_help >&2; exit 2 ;;
esac
