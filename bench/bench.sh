#!/usr/bin/env bash
# Usage: bench/bench.sh            (what `make bench` runs)
#
# Benchmarks the pipeline on this machine and prints a Markdown table with every figure:
#   1. baselines: raw Kafka (the pipeline's producer/consumer settings), raw Postgres (the
#      db-writer's batched insert and ack update on migrated shards), a raw websocket echo;
#   2. end to end: the highest rate sustained for 60 s with every message delivered and
#      receipted, then latency at 500 msg/s, at 10K msg/s (or the max, if lower) and at 80% of the
#      max, with what each hop took from the pipeline's own histograms; latency against rate as a
#      chart; the same again in delete-on-ack mode (fresh shards, topics and users); then both
#      modes at 85% of keep mode's maximum, alternated (does delete-on-ack hold it?);
#   3. ratios against the baselines;
#   4. idle connections one gateway holds, and RSS per connection (and a plain tokio TCP server's);
#   5. the connect storm: users with history (seeded into the shards, the user index rebuilt) all
#      connect to one gateway at once; time to syncDone, CPU per connect by process, memory per
#      idle connection, with 4 and with 16 shards;
#   7. optional (BENCH_PEER=1): a peer, Centrifugo v6, beside the gateway with the same client
#      (bench/peer.sh says how);
#   8. what TLS costs: plain and TLS alternated in one run, clients to the gateway (ws:// and
#      wss://: CPU per message and per connect, latency, memory per connection) and the services'
#      links to Kafka and Postgres (make stack's against the secured broker and Postgres, started
#      for it if they are not running); bench/tls.sh says how (about 7 minutes, 3 with
#      BENCH_QUICK=1; BENCH_STAGES=tls alone).
#
# Everything it starts is its own: gateways and a multiplexer from target/release with their own
# topic prefix, consumer groups and shard databases, on the Kafka and Postgres of `make stack`
# (and, in stage 8, on the secured broker and Postgres). All of it is stopped and deleted at the
# end (also on failure or Ctrl-C). The default stack (topics without prefix, chat_shard_*) is
# never touched.
#
# Output: target/bench/<run id>/ (JSON reports, PNG charts, logs, results.md); a full run also
# writes bench/RESULTS.md.
#
# Env: BENCH_STAGES  stages to run (default "baselines e2e connections storm tls"; also "peer")
#      BENCH_QUICK=1 short durations (a smoke test, minutes less; figures are rough)
#      BENCH_USERS   websocket users of the e2e load (default 1000)
#      BENCH_CONNS   idle connections to hold (default 19500)
#      BENCH_FLEET_GATEWAYS / BENCH_FLEET_CONNS  gateways, and connections each, held at the same
#                    time across processes (default 6 x 17000 = 102,000)
#      BENCH_ACK     each|batch: recipients ack every message, or per read burst (default each)
#      BENCH_GATEWAYS number of gateways for the e2e load (default 1)
#      BENCH_GATEWAY_ENV / BENCH_MULTIPLEXER_ENV  extra VAR=value settings for the e2e gateways /
#                    multiplexer (e.g. "KAFKA_LINGER_MS=10", "MULTIPLEXER_BATCH_WAIT_MS=10")
#      BENCH_START_RATE first probed rate of the search (default 400 msg/s)
#      BENCH_SEARCH_ARGS extra arguments for `loadgen search` (e.g. "--low-rate 1000")
#      BENCH_RETENTIONS retention modes the e2e search runs in, each on its own shards, topics and
#                    users (default "keep delete-on-ack"; delete-on-ack's outputs go to
#                    target/bench/<run id>/delete-on-ack/)
#      BENCH_MODES_ROUNDS rounds of the modes at one rate, after both searches: each round a
#                    confirm of each mode at 85% of keep mode's maximum (60 s; 10 with
#                    BENCH_QUICK=1), keep first in odd rounds and second in even ones; the
#                    table is bench/ab_report.py's (default 2; 0: none)
#      BENCH_STORM_USERS users of the connect storm (default 18000; 3000 with BENCH_QUICK=1; at
#                    most the fd limit less a few hundred)
#      BENCH_STORM_SHARDS shard counts to storm with, one data set each (default "4 16")
#      BENCH_STORM_CONCURRENCY connections in progress at once (default 0: every user at once)
#      BENCH_STORM_BEFORE_GATEWAY a gateway binary built from other code (e.g. a worktree of an
#                    older commit): stormed on the same data right after this code's gateway,
#                    reported as "before"; BENCH_STORM_BEFORE_LABEL names it (default "before")
#      BENCH_PROFILE=1 record CPU profiles (perf, cpu-clock) of the gateway and multiplexer
#                    during the e2e search, and of the whole machine during each connect storm:
#                    target/bench/<run>/profile-*.txt
#      BENCH_SERVICES_BIN a directory with the gateway, multiplexer and db-writer binaries to
#                    measure (default target/release, built here); the load generator and
#                    chatctl stay this tree's. bench/ab.sh uses it to compare builds
#      BENCH_PG_SERVERS admin DSNs of Postgres servers to spread the shard databases over,
#                    space-separated, shard i on server i mod their count (default: CHAT_TEST_PG
#                    alone); each server's CPU counts as Postgres's. A server a shard is how
#                    Terraform deploys them (e.g. more servers from infra/scripts/postgres.sh start
#                    --name pg2 --port 54322)
#      KAFKA_BROKERS (default 127.0.0.1:9092), CHAT_TEST_PG (admin DSN, default
#      postgres://chat@127.0.0.1:54320/postgres)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source infra/scripts/lib.sh

BIN=target/release
# What is measured: the gateway, multiplexer and db-writer (the load generator and chatctl, the
# measuring side, are always this tree's).
SERVICES_BIN="${BENCH_SERVICES_BIN:-$BIN}"
BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
PG_ADMIN="${CHAT_TEST_PG:-postgres://chat@127.0.0.1:54320/postgres}"
# The Postgres servers the shards are spread over (BENCH_PG_SERVERS; make stack's alone by default).
read -r -a PG_SERVERS <<<"${BENCH_PG_SERVERS:-$PG_ADMIN}"
DEFAULT_STAGES="baselines e2e connections storm tls"
STAGES="${BENCH_STAGES:-$DEFAULT_STAGES}"
QUICK="${BENCH_QUICK:-0}"
USERS="${BENCH_USERS:-1000}"
CONNS="${BENCH_CONNS:-19500}"
FLEET_GWS="${BENCH_FLEET_GATEWAYS:-6}"
FLEET_CONNS="${BENCH_FLEET_CONNS:-17000}"
ACK="${BENCH_ACK:-each}"
NGW="${BENCH_GATEWAYS:-1}"
RUN_ID="bench$(date +%s)"
OUT="target/bench/$RUN_ID"
PREFIX="$RUN_ID-"
SOURCE_IPS="127.0.0.2-127.0.0.5"
COMMAND="${BENCH_COMMAND:-make bench}"
mkdir -p "$OUT/logs"
START_TIME=$SECONDS

log() { printf '\n== %s (%ds)\n' "$*" "$((SECONDS - START_TIME))" >&2; }
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

# ---------------------------------------------------------------- processes we start, and cleanup
declare -A PIDS=()
DBS=()
GROUPS_TO_DELETE=() # consumer groups beyond the fixed list in cleanup (e.g. another mode's)
start_bg() { # name logfile cmd...  (env via `env` in cmd)
  local name="$1" logf="$2"
  shift 2
  "$@" >"$logf" 2>&1 &
  PIDS[$name]=$!
}
stop_bg() {
  local name="$1" pid="${PIDS[$1]:-}" waited=0
  [[ -n "$pid" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  while pid_alive "$pid" && ((waited < 150)); do sleep 0.2; waited=$((waited + 1)); done
  pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset "PIDS[$name]"
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  log "cleaning up"
  for name in "${!PIDS[@]}"; do stop_bg "$name"; done
  if [[ -x "$BIN/loadgen" ]]; then
    "$BIN/loadgen" cleanup --kafka-brokers "$BROKERS" --topic-prefix "$PREFIX" \
      --group "${PREFIX}multiplexer" --group "${PREFIX}raw" \
      --group "${PREFIX}gateway-lgw1" --group "${PREFIX}gateway-lgw2" --group "${PREFIX}gateway-lgc1" \
      --group "${PREFIX}gateway-lgs1" \
      $(for g in $(seq 1 "$FLEET_GWS"); do printf -- " --group %sgateway-lgf%s" "$PREFIX" "$g"; done) \
      $(for g in "${GROUPS_TO_DELETE[@]}"; do printf -- " --group %s" "$g"; done) \
      >>"$OUT/logs/cleanup.log" 2>&1 || echo "bench: topic cleanup failed (see $OUT/logs/cleanup.log)" >&2
  fi
  for entry in "${DBS[@]}"; do
    psql -q "${entry% *}" -c "DROP DATABASE IF EXISTS \"${entry##* }\" WITH (FORCE)" >>"$OUT/logs/cleanup.log" 2>&1 || true
  done
  if declare -F tls_cleanup >/dev/null; then tls_cleanup; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_ready() { # url name
  local deadline=$((SECONDS + 60))
  until curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; do
    pid_alive "${PIDS[$2]}" || { tail_log "$OUT/logs/$2.log"; die "$2 exited during start-up"; }
    ((SECONDS < deadline)) || { tail_log "$OUT/logs/$2.log"; die "$2 not ready after 60 s"; }
    sleep 0.3
  done
}

free_port() { # first port from $1 up that nothing listens on
  local p="$1"
  while port_open 127.0.0.1 "$p"; do p=$((p + 1)); done
  echo "$p"
}

# ---------------------------------------------------------------- checks and build
port_open 127.0.0.1 "${BROKERS##*:}" || die "Kafka is not up on $BROKERS (make stack)"
for server in "${PG_SERVERS[@]}"; do
  psql -q "$server" -Atc 'select 1' >/dev/null 2>&1 || die "Postgres is not up at $server (make stack)"
done
# Descriptors: the gateway and the connection holder each need ~CONNS + a few dozen.
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
log "building (release): loadgen, gateway, multiplexer, chatctl, db-writer"
cargo build --release --quiet -p loadgen -p gateway -p multiplexer -p chatctl -p db-writer --bins \
  || die "cargo build failed"

KAFKA_PID="$(ss -ltnpH "sport = :${BROKERS##*:}" | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2)"
[[ -n "$KAFKA_PID" ]] || die "cannot find the Kafka broker's pid"
KAFKA_W=(--watch "kafka=$KAFKA_PID")
PG_W=()
for server in "${PG_SERVERS[@]}"; do
  PG_PID="$(head -n1 "$(psql "$server" -Atc 'show data_directory')/postmaster.pid" 2>/dev/null || true)"
  [[ -n "$PG_PID" ]] || die "cannot find the postmaster's pid of $server (show data_directory)"
  PG_W+=(--watch "postgres=$PG_PID+")
done

cat >"$OUT/meta.json" <<EOF
{"date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "nproc": $(nproc), "memory": "$(free -g | awk '/^Mem:/ {print $2 " GiB"}')",
 "kernel": "$(uname -sr)", "commit": "$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '+dirty')",
 "command": "$COMMAND", "run_id": "$RUN_ID",
 "note": "Kafka and Postgres are the shared ones of make stack (other work on this machine may add noise); fd soft limit $(ulimit -Sn)."}
EOF

log "idle CPU of the shared Kafka and Postgres (other work on this machine)"
"$BIN/loadgen" idle --seconds 5 "${KAFKA_W[@]}" "${PG_W[@]}" --out "$OUT/idle.json"

if [[ "$QUICK" == 1 ]]; then
  KAFKA_ARGS=(--records 60000 --seconds 5); PG_ARGS=(--rows 20000 --acks-each 4000)
  ECHO_ARGS=(--flat-seconds 4 --seconds 5)
  SEARCH_ARGS=(--probe-seconds 5 --confirm-seconds 10 --latency-seconds 5 --low-seconds 10 --budget-seconds 60)
else
  KAFKA_ARGS=(); PG_ARGS=(); ECHO_ARGS=(); SEARCH_ARGS=()
fi
# shellcheck disable=SC2206
SEARCH_ARGS+=(${BENCH_SEARCH_ARGS:-})

create_dbs() { # name_prefix [shards, default 4] -> sets DSNS to the DSN list
  local dsns="" i db server
  for ((i = 0; i < ${2:-4}; i++)); do
    db="${RUN_ID}_$1$i" server="${PG_SERVERS[i % ${#PG_SERVERS[@]}]}"
    psql -q "$server" -c "CREATE DATABASE \"$db\"" >/dev/null
    DBS+=("$server $db")
    dsns+="${dsns:+,}$(dsn_with_db "$server" "$db")"
  done
  SHARD_DSNS="$dsns" "$SERVICES_BIN/db-writer" migrate >>"$OUT/logs/migrate.log" 2>&1 || die "migrate failed"
  DSNS="$dsns"
}

# The machine's speed through the run: the same work on one core (SHA-256 over a 1 MiB buffer,
# 256 times, the best of 3), timed before each stage and each e2e search while nothing of the run
# is busy, in MB/s. Its speed changed within runs by more than most changes move a figure: in the
# run at 9f19d27 the raw stages at the start matched the run before's (Kafka 3.6 against 3.4 µs a
# record, the insert 19.7 against 20.3), yet Centrifugo, measured at the end, took 1.41 times the
# CPU a message it took at the end of the run before. A figure from late in a run is read against
# this (docs/performance-log.md, 2026-12-06). Each reading goes to $OUT/yardstick.tsv and the
# results end with them.
yardstick() { # what comes next
  local mbs
  mbs="$(python3 -c '
import hashlib, time
buf, best = b"\x5a" * (1 << 20), None
for _ in range(3):
    t = time.perf_counter()
    for _ in range(256):
        hashlib.sha256(buf).digest()
    best = min(best or 1e9, time.perf_counter() - t)
print(round(256 / best))' 2>/dev/null || echo "?")"
  printf '%s\t%s\t%s\n' "$((SECONDS - START_TIME))" "$1" "$mbs" >>"$OUT/yardstick.tsv"
  log "the machine's speed before $1: SHA-256 at $mbs MB/s on one core"
}

# The yardstick's readings as a section of the results: each one, and its ratio to the first.
yardstick_section() {
  [[ -s "$OUT/yardstick.tsv" ]] || return 0
  echo
  echo "### The machine's speed through the run"
  echo
  echo "The same work on one core (SHA-256 over a 1 MiB buffer, 256 times, the best of 3) before each stage and each e2e search, with nothing of the run busy. A figure measured where the machine ran slower than at the start is slower by that much for reasons outside the code."
  echo
  echo "| at (s) | before | MB/s | / first |"
  echo "|---:|---|---:|---:|"
  awk -F'\t' 'NR == 1 { first = $3 } {
      r = (first > 0 && $3 > 0) ? sprintf("%.2f", $3 / first) : "?"
      printf "| %s | %s | %s | %s |\n", $1, $2, $3, r }' "$OUT/yardstick.tsv"
}

# ---------------------------------------------------------------- 1. baselines
if has_stage baselines; then
  yardstick "the baselines"
  log "baseline: raw Kafka"
  "$BIN/chatctl" topics --brokers "$BROKERS" --prefix "${PREFIX}raw-" --gateways x >>"$OUT/logs/topics.log"
  "$BIN/loadgen" raw-kafka --brokers "$BROKERS" --topic "${PREFIX}raw-inbound" --group "${PREFIX}raw" \
    --presence-topic "${PREFIX}raw-presence" \
    --watch loadgen=self "${KAFKA_W[@]}" --out "$OUT/kafka.json" "${KAFKA_ARGS[@]}"

  log "baseline: raw Postgres"
  create_dbs raw; RAW_DSNS="$DSNS"
  "$BIN/loadgen" raw-pg --dsns "$RAW_DSNS" --watch loadgen=self "${PG_W[@]}" --out "$OUT/pg.json" "${PG_ARGS[@]}"

  log "baseline: raw websocket echo"
  ECHO_PORT="$(free_port 18490)"
  start_bg echo "$OUT/logs/echo.log" "$BIN/loadgen" echo-server --addr "127.0.0.1:$ECHO_PORT"
  sleep 0.5
  "$BIN/loadgen" echo --url "ws://127.0.0.1:$ECHO_PORT" --source-ips "$SOURCE_IPS" \
    --watch loadgen=self --watch "echo-server=${PIDS[echo]}" --out "$OUT/echo.json" "${ECHO_ARGS[@]}"
  stop_bg echo
fi

# ---------------------------------------------------------------- 2. end to end
# A gateway's operations listener (/metrics, /readyz): its public port + 1000.
gateway_ops() { echo "http://127.0.0.1:$(($1 + 1000))"; }
# DEV_TOKENS=true: without JWT_SECRET a gateway refuses to start otherwise (loadgen signs with
# the same secret, JWT_SECRET or the development one).
gateway_env() { # id port  (GW_DSNS, GW_TOPIC_PREFIX, GW_RETENTION override the defaults)
  echo GATEWAY_ID="$1" GATEWAY_ADDR="127.0.0.1:$2" GATEWAY_METRICS_ADDR="127.0.0.1:$(($2 + 1000))" DEV_TOKENS=true TOPIC_PREFIX="${GW_TOPIC_PREFIX:-$PREFIX}" KAFKA_BROKERS="$BROKERS" \
    SHARD_DSNS="${GW_DSNS:-${E2E_DSNS:-}}" SHARD_POOL_SIZE=4 RUST_LOG=warn WEB_DIR=/nonexistent \
    CONN_RATE_PER_SEC=1000000 CONN_RATE_BURST=1000000 USER_RATE_PER_SEC=1000000 USER_RATE_BURST=1000000 \
    MAX_CONNS_PER_ADDR=100000 ${GW_RETENTION:+RETENTION=$GW_RETENTION} ${BENCH_GATEWAY_ENV:-}
}
RETENTIONS="${BENCH_RETENTIONS:-keep delete-on-ack}"
for retention in $RETENTIONS; do
  [[ "$retention" == keep || "$retention" == delete-on-ack ]] \
    || die "BENCH_RETENTIONS: unknown retention mode '$retention' (keep, delete-on-ack)"
done
if has_stage e2e || has_stage connections; then
  "$BIN/chatctl" topics --brokers "$BROKERS" --prefix "$PREFIX" --gateways "lgw1,lgw2,lgc1$(for g in $(seq 1 "$FLEET_GWS"); do printf ",lgf%s" "$g"; done)" >>"$OUT/logs/topics.log"
  create_dbs s; E2E_DSNS="$DSNS"
fi

# Postgres settled before each e2e search: every database of the run vacuumed, then each server
# checkpointed, so that the background work left by what ran before (autovacuum's pass over the
# millions of rows an earlier search inserted, the checkpointer's writes of their pages) is done
# before the search's trials, not during them, and each search starts alike (the first finds
# only the baselines' databases). It takes a few seconds: in the run at 9f19d27, 1 to 4 s, so
# little was left to do, and delete-on-ack's search, which follows keep mode's on the same server,
# still ran slower late than alone (docs/performance-log.md, 2026-12-06); the yardstick readings
# (above) show whether the machine did.
settle_postgres() {
  local t0=$SECONDS entry server
  for entry in "${DBS[@]}"; do
    server="${entry% *}"
    psql -q "$(dsn_with_db "$server" "${entry##* }")" -c 'VACUUM (ANALYZE)' >>"$OUT/logs/settle.log" 2>&1 \
      || echo "bench: vacuuming ${entry##* } failed (see $OUT/logs/settle.log)" >&2
  done
  for server in "${PG_SERVERS[@]}"; do
    psql -q "$server" -c 'CHECKPOINT' >>"$OUT/logs/settle.log" 2>&1 \
      || echo "bench: a checkpoint on $server failed (see $OUT/logs/settle.log)" >&2
  done
  log "Postgres settled: ${#DBS[@]} databases vacuumed, ${#PG_SERVERS[@]} server(s) checkpointed in $((SECONDS - t0)) s"
}

# One e2e search: gateways and a multiplexer in one retention mode on their own shards, topic
# prefix, consumer groups and users; the search scrapes both processes' metrics around each trial.
e2e_search() { # retention out_dir topic_prefix dsns user_prefix tag (of process and log names)
  local retention="$1" dir="$2" prefix="$3" dsns="$4" users="$5" tag="$6" g port mx_port
  local urls=() watch_gw=() metrics=() gw_ports=()
  mkdir -p "$dir"
  settle_postgres
  local where="${dir#"$OUT"}"
  where="${where#/}"
  yardstick "e2e, ${where:-the search in $retention mode}"
  log "end to end ($retention): $NGW gateway(s) + 1 multiplexer, $USERS users, ack $ACK"
  for g in $(seq 1 "$NGW"); do
    port="$(free_port $((18480 + g)))"
    # shellcheck disable=SC2046
    start_bg "${tag}lgw$g" "$OUT/logs/${tag}lgw$g.log" \
      env $(GW_DSNS="$dsns" GW_TOPIC_PREFIX="$prefix" GW_RETENTION="$retention" gateway_env "lgw$g" "$port") \
      "$SERVICES_BIN/gateway"
    wait_ready "$(gateway_ops "$port")/readyz" "${tag}lgw$g"
    urls+=(--url "ws://127.0.0.1:$port"); watch_gw+=(--watch "gateway=${PIDS[${tag}lgw$g]}")
    metrics+=(--metrics "gateway=$(gateway_ops "$port")/metrics")
    gw_ports+=("$port")
  done
  mx_port="$(free_port 18489)"
  # shellcheck disable=SC2086
  start_bg "${tag}multiplexer" "$OUT/logs/${tag}multiplexer.log" env TOPIC_PREFIX="$prefix" KAFKA_BROKERS="$BROKERS" \
    SHARD_DSNS="$dsns" SHARD_POOL_SIZE=4 MULTIPLEXER_GROUP="${prefix}multiplexer" RETENTION="$retention" \
    MULTIPLEXER_HTTP_ADDR="127.0.0.1:$mx_port" RUST_LOG=warn ${BENCH_MULTIPLEXER_ENV:-} "$SERVICES_BIN/multiplexer"
  wait_ready "http://127.0.0.1:$mx_port/readyz" "${tag}multiplexer"
  metrics+=(--metrics "multiplexer=http://127.0.0.1:$mx_port/metrics")
  if [[ "${BENCH_PROFILE:-0}" == 1 ]] && command -v perf >/dev/null; then
    start_bg perf-gw "$OUT/logs/${tag}perf-gw.log" perf record -e cpu-clock -F 499 -g -o "$dir/perf-gateway.data" -p "${PIDS[${tag}lgw1]}"
    start_bg perf-mx "$OUT/logs/${tag}perf-mx.log" perf record -e cpu-clock -F 499 -g -o "$dir/perf-multiplexer.data" -p "${PIDS[${tag}multiplexer]}"
  fi
  "$BIN/loadgen" search "${urls[@]}" --users "$USERS" --source-ips "$SOURCE_IPS" --ack "$ACK" \
    --user-prefix "$users" --out-dir "$dir" --start-rate "${BENCH_START_RATE:-400}" "${metrics[@]}" \
    --watch loadgen=self "${watch_gw[@]}" --watch "multiplexer=${PIDS[${tag}multiplexer]}" "${KAFKA_W[@]}" "${PG_W[@]}" \
    "${SEARCH_ARGS[@]}" || echo "bench: the e2e search ($retention) failed" >&2
  if [[ -n "${PIDS[perf-gw]:-}" ]]; then
    kill -INT "${PIDS[perf-gw]}" "${PIDS[perf-mx]}" 2>/dev/null || true
    wait "${PIDS[perf-gw]}" "${PIDS[perf-mx]}" 2>/dev/null || true
    unset "PIDS[perf-gw]" "PIDS[perf-mx]"
    for p in gateway multiplexer; do
      perf report -i "$dir/perf-$p.data" --stdio --no-children --sort symbol --percent-limit 1 -g none \
        >"$dir/profile-$p.txt" 2>/dev/null || true
      perf report -i "$dir/perf-$p.data" --stdio --no-children --sort dso --percent-limit 1 -g none \
        >"$dir/profile-$p-dso.txt" 2>/dev/null || true
    done
  fi
  curl -fsS "http://127.0.0.1:$mx_port/metrics" >"$dir/metrics-multiplexer.txt" 2>/dev/null || true
  curl -fsS "$(gateway_ops "${gw_ports[0]}")/metrics" >"$dir/metrics-gateway.txt" 2>/dev/null || true
  stop_bg "${tag}multiplexer"
  for g in $(seq 1 "$NGW"); do stop_bg "${tag}lgw$g"; done
}

# The modes at one rate, alternated: delete-on-ack must hold 85% of keep mode's maximum. The two
# searches above ran one after the other, and on a machine whose speed swings within the hour
# the ratio of their maxima can be the machine's; here both modes run at the same rate, keep
# and delete-on-ack in turn (ABBA: keep first in odd rounds), on the searches' own services,
# topics and shards with new users, and bench/ab_report.py puts each run's figures side by side.
modes_check() {
  local rate max round mode runs="$OUT/modes/runs.tsv" seconds=60 saved_args saved_start
  local heading="### 2c. The modes at one rate"
  max="$(python3 -c 'import json, sys; print(round(json.load(open(sys.argv[1])).get("max_sustained_rate") or 0))' \
    "$OUT/search.json" 2>/dev/null || echo 0)"
  rate="$(python3 -c 'import math, sys; print(math.ceil(float(sys.argv[1]) * 0.85))' "$max")"
  mkdir -p "$OUT/modes"
  if [[ "$rate" -le 0 ]]; then
    printf '%s\n\n%s\n' "$heading" "Not run: keep mode's search found no maximum." >"$OUT/modes.md"
    return
  fi
  [[ "$QUICK" == 1 ]] && seconds=10
  log "the modes at one rate: $rate msg/s (0.85 of keep mode's $max), ${BENCH_MODES_ROUNDS:-2} rounds"
  saved_args=("${SEARCH_ARGS[@]}") saved_start="${BENCH_START_RATE:-}"
  SEARCH_ARGS=(--max-rate "$rate" --probe-seconds 5 --confirm-seconds "$seconds" --low-rate "$rate"
    --low-seconds 10 --latency-rate "$rate" --latency-seconds 5 --budget-seconds 10)
  BENCH_START_RATE="$rate"
  : >"$runs"
  for round in $(seq 1 "${BENCH_MODES_ROUNDS:-2}"); do
    local order="keep delete-on-ack"
    ((round % 2 == 0)) && order="delete-on-ack keep"
    for mode in $order; do
      if [[ "$mode" == keep ]]; then
        e2e_search keep "$OUT/modes/$round-keep" "$PREFIX" "$E2E_DSNS" "${RUN_ID}m${round}k" "m$round-"
      else
        e2e_search delete-on-ack "$OUT/modes/$round-doa" "$DOA_PREFIX" "$DOA_DSNS" "${RUN_ID}m${round}d" "m$round-doa-"
      fi
      printf '%s\t%s\t%s\n' "$round" "$mode" "$OUT/modes/$round-${mode/delete-on-ack/doa}" >>"$runs"
    done
  done
  SEARCH_ARGS=("${saved_args[@]}") BENCH_START_RATE="$saved_start"
  {
    echo "$heading: $rate msg/s, 0.85 of keep mode's maximum ($max msg/s), alternated"
    echo
    python3 bench/ab_report.py "$rate" "$runs" || echo "(the report failed)"
  } >"$OUT/modes.md"
}

if has_stage e2e; then
  for retention in $RETENTIONS; do
    if [[ "$retention" == keep ]]; then
      e2e_search keep "$OUT" "$PREFIX" "$E2E_DSNS" "${RUN_ID}e" ""
    else
      # Its own topics (under the run's prefix, so cleanup deletes them), groups and shards.
      DOA_PREFIX="${PREFIX}doa-"
      "$BIN/chatctl" topics --brokers "$BROKERS" --prefix "$DOA_PREFIX" \
        --gateways "$(seq -s, -f 'lgw%g' 1 "$NGW")" >>"$OUT/logs/topics.log"
      GROUPS_TO_DELETE+=("${DOA_PREFIX}multiplexer")
      for g in $(seq 1 "$NGW"); do GROUPS_TO_DELETE+=("${DOA_PREFIX}gateway-lgw$g"); done
      create_dbs d; DOA_DSNS="$DSNS"
      e2e_search delete-on-ack "$OUT/delete-on-ack" "$DOA_PREFIX" "$DOA_DSNS" "${RUN_ID}d" doa-
    fi
  done
  if [[ -n "${DOA_DSNS:-}" && " $RETENTIONS " == *" keep "* && "${BENCH_MODES_ROUNDS:-2}" -gt 0 ]]; then
    modes_check
  fi
fi

# ---------------------------------------------------------------- 4. connections
if has_stage connections; then
  yardstick "the connection stages"
  log "connections: $CONNS idle websockets on one gateway (fd limit $(ulimit -Sn))"
  port="$(free_port 18486)"
  # shellcheck disable=SC2046
  start_bg lgc1 "$OUT/logs/lgc1.log" env $(gateway_env lgc1 "$port") "$SERVICES_BIN/gateway"
  wait_ready "$(gateway_ops "$port")/readyz" lgc1
  sleep 2
  "$BIN/loadgen" hold --url "ws://127.0.0.1:$port" --mode ws --conns "$CONNS" --source-ips "$SOURCE_IPS" \
    --target-pid "${PIDS[lgc1]}" --user-prefix "${RUN_ID}c" --out "$OUT/hold-gateway.json" \
    || echo "bench: holding connections on the gateway failed" >&2
  stop_bg lgc1

  log "connections: $CONNS idle websockets on a plain tokio-tungstenite server"
  port="$(free_port 18488)"
  start_bg echo2 "$OUT/logs/echo2.log" "$BIN/loadgen" echo-server --addr "127.0.0.1:$port"
  sleep 1
  "$BIN/loadgen" hold --url "ws://127.0.0.1:$port" --mode ws-raw --conns "$CONNS" --source-ips "$SOURCE_IPS" \
    --target-pid "${PIDS[echo2]}" --hold-seconds 2 --out "$OUT/hold-ws.json" \
    || echo "bench: holding connections on the websocket server failed" >&2
  stop_bg echo2

  log "connections: $CONNS idle sockets on a plain tokio TCP server"
  port="$(free_port 18487)"
  start_bg tcp "$OUT/logs/tcp.log" "$BIN/loadgen" tcp-server --addr "127.0.0.1:$port"
  sleep 1
  "$BIN/loadgen" hold --url "ws://127.0.0.1:$port" --mode tcp --conns "$CONNS" --source-ips "$SOURCE_IPS" \
    --target-pid "${PIDS[tcp]}" --hold-seconds 2 --out "$OUT/hold-tcp.json" \
    || echo "bench: holding connections on the TCP server failed" >&2
  stop_bg tcp

  log "connections: $FLEET_GWS gateways x $FLEET_CONNS idle websockets, all open at once"
  rm -rf "$OUT/fleet-barrier"
  HOLDERS=()
  for g in $(seq 1 "$FLEET_GWS"); do
    port="$(free_port $((18500 + g)))"
    # shellcheck disable=SC2046
    start_bg "lgf$g" "$OUT/logs/lgf$g.log" env $(gateway_env "lgf$g" "$port") "$SERVICES_BIN/gateway"
    wait_ready "$(gateway_ops "$port")/readyz" "lgf$g"
    # Each holder its own source addresses: every bound source address has its own port range.
    start_bg "holder$g" "$OUT/logs/holder$g.log" "$BIN/loadgen" hold --url "ws://127.0.0.1:$port" --mode ws \
      --conns "$FLEET_CONNS" --source-ips "127.0.$((10 + g)).2-127.0.$((10 + g)).5" --target-pid "${PIDS[lgf$g]}" \
      --user-prefix "${RUN_ID}f$g" --hold-seconds 5 --barrier "$OUT/fleet-barrier:$FLEET_GWS" \
      --out "$OUT/hold-fleet-$g.json"
    HOLDERS+=("holder$g")
  done
  for h in "${HOLDERS[@]}"; do
    wait "${PIDS[$h]}" || echo "bench: $h failed (see $OUT/logs/$h.log)" >&2
    unset "PIDS[$h]"
  done
  for g in $(seq 1 "$FLEET_GWS"); do stop_bg "lgf$g"; done
fi

# ---------------------------------------------------------------- 5. connect storm
if has_stage storm; then
  yardstick "the connect storm"
  STORM_USERS="${BENCH_STORM_USERS:-$([[ "$QUICK" == 1 ]] && echo 3000 || echo 18000)}"
  STORM_USER_PREFIX="${RUN_ID}s"
  STORM_PLAN=(--users "$STORM_USERS" --user-prefix "$STORM_USER_PREFIX")
  "$BIN/chatctl" topics --brokers "$BROKERS" --prefix "$PREFIX" --gateways lgs1 >>"$OUT/logs/topics.log"
  storm_once() { # shards file label binary
    local port
    port="$(free_port 18520)"
    # shellcheck disable=SC2046,SC2086
    start_bg "gw-$2" "$OUT/logs/gw-$2.log" env $(GW_DSNS="$STORM_DSNS" gateway_env lgs1 "$port") \
      ${BENCH_STORM_GATEWAY_ENV:-} "$4"
    wait_ready "$(gateway_ops "$port")/readyz" "gw-$2"
    sleep 2
    if [[ "${BENCH_PROFILE:-0}" == 1 ]] && command -v perf >/dev/null; then
      # Every process on the machine: Postgres backends start during the storm.
      start_bg perf-storm "$OUT/logs/perf-$2.log" perf record -a -e cpu-clock -F 499 -g -o "$OUT/perf-$2.data"
    fi
    "$BIN/loadgen" storm --url "ws://127.0.0.1:$port" "${STORM_PLAN[@]}" --source-ips "$SOURCE_IPS" \
      --concurrency "${BENCH_STORM_CONCURRENCY:-0}" --target-pid "${PIDS[gw-$2]}" --dsns "$STORM_DSNS" \
      --label "$3" --watch loadgen=self --watch "gateway=${PIDS[gw-$2]}" "${KAFKA_W[@]}" "${PG_W[@]}" \
      --out "$OUT/$2.json" || echo "bench: the storm on $1 shards ($3) failed" >&2
    if [[ -n "${PIDS[perf-storm]:-}" ]]; then
      kill -INT "${PIDS[perf-storm]}" 2>/dev/null || true
      wait "${PIDS[perf-storm]}" 2>/dev/null || true
      unset "PIDS[perf-storm]"
      perf report -i "$OUT/perf-$2.data" --stdio --no-children --sort comm,dso --percent-limit 1 -g none \
        >"$OUT/profile-$2-dso.txt" 2>/dev/null || true
      perf report -i "$OUT/perf-$2.data" --stdio --no-children --comms postgres --sort symbol --percent-limit 0.5 \
        -g none >"$OUT/profile-$2-postgres.txt" 2>/dev/null || true
      perf report -i "$OUT/perf-$2.data" --stdio --no-children --comms gateway --sort symbol --percent-limit 0.5 \
        -g none >"$OUT/profile-$2-gateway.txt" 2>/dev/null || true
    fi
    stop_bg "gw-$2"
  }
  for shards in ${BENCH_STORM_SHARDS:-4 16}; do
    log "connect storm: seeding $STORM_USERS users with history into $shards shards"
    create_dbs "st${shards}_" "$shards"; STORM_DSNS="$DSNS"
    "$BIN/loadgen" storm-seed --dsns "$STORM_DSNS" "${STORM_PLAN[@]}" --out "$OUT/storm-seed-$shards.json" \
      || die "seeding the storm's shards failed"
    if "$SERVICES_BIN/db-writer" rebuild-index --help >/dev/null 2>&1; then
      log "connect storm: db-writer rebuild-index ($shards shards)"
      t0=$SECONDS
      SHARD_DSNS="$STORM_DSNS" "$SERVICES_BIN/db-writer" rebuild-index >>"$OUT/logs/rebuild-index-$shards.log" 2>&1 \
        || die "db-writer rebuild-index failed (see $OUT/logs/rebuild-index-$shards.log)"
      echo "rebuild-index on $shards shards: $((SECONDS - t0)) s" >>"$OUT/logs/rebuild-index-$shards.log"
    else
      echo "bench: this db-writer has no rebuild-index; the gateway syncs without the user index" >&2
    fi
    built=""
    for dsn in ${STORM_DSNS//,/ }; do
      # Settle what seeding left to do before measuring: vacuum (visibility, statistics), checkpoint.
      psql -q "$dsn" -c 'VACUUM ANALYZE' -c 'CHECKPOINT' >>"$OUT/logs/migrate.log" 2>&1
      built+="$(psql -q "$dsn" -Atc 'SELECT built FROM index_state' 2>/dev/null || echo none)"
    done
    log "connect storm: index built per shard: $built"
    storm_once "$shards" "storm-$shards" "this code" "$SERVICES_BIN/gateway"
    if [[ -n "${BENCH_STORM_BEFORE_GATEWAY:-}" ]]; then
      storm_once "$shards" "storm-before-$shards" "${BENCH_STORM_BEFORE_LABEL:-before}" "$BENCH_STORM_BEFORE_GATEWAY"
    fi
  done
fi

# ---------------------------------------------------------------- 8. what TLS costs
# bench/tls.sh: its outputs in $OUT/tls/, section 8 of the results.
if has_stage tls; then
  yardstick "the TLS stage"
  source bench/tls.sh
fi

# ---------------------------------------------------------------- 7. a peer: Centrifugo
# Optional (BENCH_PEER=1 or "peer" in BENCH_STAGES): bench/peer.sh writes $OUT/peer.md.
if has_stage peer || [[ "${BENCH_PEER:-0}" == 1 ]]; then
  yardstick "the peer stage"
  source bench/peer.sh
fi

# ---------------------------------------------------------------- the table
log "results"
yardstick "the report"
{ "$BIN/loadgen" report --dir "$OUT"; yardstick_section; } >"$OUT/results.md"
echo
cat "$OUT/results.md"
echo
echo "JSON reports, charts (trial-*.png) and logs: $OUT/"
if [[ "$STAGES" == "$DEFAULT_STAGES" && "$QUICK" != 1 ]]; then
  { echo "# Bench results"; echo; echo "Produced by \`$COMMAND\` (bench/bench.sh); charts and JSON of this run were in $OUT/."; echo;
    cat "$OUT/results.md"; } >bench/RESULTS.md
  echo "wrote bench/RESULTS.md"
fi
echo "bench: done in $((SECONDS - START_TIME)) s"
