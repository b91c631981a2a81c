# shellcheck shell=bash disable=SC2154
# (sourced by bench/bench.sh, which sets BIN, OUT, PIDS, RUN_ID, PREFIX, SOURCE_IPS, KAFKA_W ...)
#
# Stage "peer" (BENCH_STAGES=peer, or BENCH_PEER=1 beside other stages): Centrifugo, the websocket
# server of another project, measured beside the gateway with the same client in the same run
# (`loadgen peer measure`): memory per idle connection, connects per second, and delivery latency
# between pairs of users at 500 msg/s. Writes $OUT/peer-gateway.json, $OUT/peer-centrifugo.json,
# $OUT/peer.json and $OUT/peer.md (section 7 of the results, placed there by loadgen report).
#
# Centrifugo is built with `go install` from the Go module proxy into target/peer/bin (kept: a
# binary of the pinned version is not built again); without Go the stage is skipped and says so.
# The gateway side is the whole pipeline: a gateway and a multiplexer on this run's topics, with
# shard databases of their own, so the stage runs alone too.
#
# Env: BENCH_PEER_CONNS        idle connections held on each server (default 5000)
#      BENCH_PEER_CONCURRENCY  connects in progress at once (default 64)
#      BENCH_PEER_USERS        users of the latency phase, in pairs (default 200)
#      BENCH_PEER_RATE         messages per second of the latency phase (default 500)
#      BENCH_PEER_SECONDS      measured length of the latency phase, after a warm-up at the same
#                              rate (default 20 s after 5 s; 8 s after 2 s with BENCH_QUICK=1)
#      GO                      the go command (default: go on PATH, else /usr/local/go/bin/go)

PEER_MODULE=github.com/centrifugal/centrifugo/v6
PEER_VERSION=v6.9.1

peer_skip() { # reason
  log "peer: skipped, $1"
  printf '\n### 7. A peer in the same run: Centrifugo %s\n\nSkipped: %s.\n' "$PEER_VERSION" "$1" >"$OUT/peer.md"
}

# Sets PEER_BIN to a Centrifugo binary of PEER_VERSION, built if missing. Fails if it cannot be.
peer_build() {
  local gobin="$PWD/target/peer/bin"
  PEER_BIN="$gobin/centrifugo"
  if [[ -x "$PEER_BIN" ]] && "$GO" version -m "$PEER_BIN" 2>/dev/null \
    | grep -Eq "^[[:space:]]+mod[[:space:]]+${PEER_MODULE}[[:space:]]+${PEER_VERSION}([[:space:]]|$)"; then
    return 0
  fi
  log "peer: go install $PEER_MODULE@$PEER_VERSION (a few minutes the first time)"
  mkdir -p "$gobin"
  # GOTOOLCHAIN=local: build with the Go that is here, never fetch another toolchain.
  GOBIN="$gobin" GOTOOLCHAIN=local "$GO" install "$PEER_MODULE@$PEER_VERSION" \
    >"$OUT/logs/peer-go-install.log" 2>&1
}

# Like wait_ready, but a peer that does not come up skips the stage instead of ending the bench.
peer_wait() { # url name
  local deadline=$((SECONDS + 30))
  until curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; do
    if ! pid_alive "${PIDS[$2]}" || ((SECONDS >= deadline)); then
      tail -n 20 "$OUT/logs/$2.log" >&2 || true
      return 1
    fi
    sleep 0.3
  done
}

peer_stage() {
  local conns="${BENCH_PEER_CONNS:-5000}" concurrency="${BENCH_PEER_CONCURRENCY:-64}"
  local users="${BENCH_PEER_USERS:-200}" rate="${BENCH_PEER_RATE:-500}"
  local seconds="${BENCH_PEER_SECONDS:-$([[ "$QUICK" == 1 ]] && echo 8 || echo 20)}"
  local warmup=5
  if [[ "$QUICK" == 1 ]]; then warmup=2; fi
  local port mx_port cf_port t0=$SECONDS

  GO="${GO:-$(command -v go || true)}"
  if [[ -z "$GO" && -x /usr/local/go/bin/go ]]; then GO=/usr/local/go/bin/go; fi
  if [[ -z "$GO" ]]; then
    peer_skip "Go is not installed"
    return 0
  fi
  if ! peer_build; then
    tail -n 20 "$OUT/logs/peer-go-install.log" >&2 || true
    peer_skip "go install $PEER_MODULE@$PEER_VERSION failed (see logs/peer-go-install.log)"
    return 0
  fi

  local measure=(--conns "$conns" --concurrency "$concurrency" --source-ips "$SOURCE_IPS"
    --users "$users" --rate "$rate" --seconds "$seconds" --warmup-seconds "$warmup" --watch loadgen=self)

  log "peer: the gateway (+ multiplexer, Kafka, Postgres): $conns idle connections, $concurrency at a time; $users users at $rate msg/s for $seconds s"
  "$BIN/chatctl" topics --brokers "$BROKERS" --prefix "$PREFIX" --gateways lgw1 >>"$OUT/logs/topics.log"
  create_dbs peer
  local peer_dsns="$DSNS"
  port="$(free_port 18530)"
  # shellcheck disable=SC2046
  start_bg peer-gw "$OUT/logs/peer-gw.log" env $(GW_DSNS="$peer_dsns" gateway_env lgw1 "$port") "$BIN/gateway"
  wait_ready "$(gateway_ops "$port")/readyz" peer-gw
  mx_port="$(free_port 18539)"
  start_bg peer-mx "$OUT/logs/peer-mx.log" env TOPIC_PREFIX="$PREFIX" KAFKA_BROKERS="$BROKERS" \
    SHARD_DSNS="$peer_dsns" SHARD_POOL_SIZE=4 MULTIPLEXER_GROUP="${PREFIX}multiplexer" \
    MULTIPLEXER_HTTP_ADDR="127.0.0.1:$mx_port" RUST_LOG=warn "$BIN/multiplexer"
  wait_ready "http://127.0.0.1:$mx_port/readyz" peer-mx
  sleep 2
  "$BIN/loadgen" peer measure --server gateway --url "ws://127.0.0.1:$port" --target-pid "${PIDS[peer-gw]}" \
    --user-prefix "${RUN_ID}pg" --label gateway "${measure[@]}" \
    --watch "gateway=${PIDS[peer-gw]}" --watch "multiplexer=${PIDS[peer-mx]}" "${KAFKA_W[@]}" "${PG_W[@]}" \
    --out "$OUT/peer-gateway.json" || echo "bench: peer: measuring the gateway failed" >&2
  stop_bg peer-mx
  stop_bg peer-gw

  log "peer: Centrifugo $PEER_VERSION: the same"
  cf_port="$(free_port 18540)"
  "$BIN/loadgen" peer centrifugo-config --port "$cf_port" --out "$OUT/centrifugo.json"
  start_bg centrifugo "$OUT/logs/centrifugo.log" "$PEER_BIN" --config "$OUT/centrifugo.json"
  if ! peer_wait "http://127.0.0.1:$cf_port/health" centrifugo; then
    stop_bg centrifugo
    peer_skip "Centrifugo did not start (see logs/centrifugo.log)"
    return 0
  fi
  sleep 2
  "$BIN/loadgen" peer measure --server centrifugo --url "ws://127.0.0.1:$cf_port" \
    --target-pid "${PIDS[centrifugo]}" --user-prefix "${RUN_ID}pc" --label "Centrifugo $PEER_VERSION" \
    "${measure[@]}" --watch "centrifugo=${PIDS[centrifugo]}" \
    --out "$OUT/peer-centrifugo.json" || echo "bench: peer: measuring Centrifugo failed" >&2
  stop_bg centrifugo

  "$BIN/loadgen" peer report --gateway "$OUT/peer-gateway.json" --centrifugo "$OUT/peer-centrifugo.json" \
    --centrifugo-version "$PEER_VERSION" --out-json "$OUT/peer.json" --out-md "$OUT/peer.md"
  log "peer: done in $((SECONDS - t0)) s"
}

peer_stage
