# shellcheck shell=bash disable=SC2154,SC2153
# (sourced by bench/bench.sh, which sets BIN, OUT, PIDS, RUN_ID, PREFIX, SOURCE_IPS, KAFKA_W ...)
#
# Stage "tls" (BENCH_STAGES=tls): what TLS costs, plain and TLS side by side in one run, the
# modes alternated (plain, TLS, TLS, plain) so that drift falls on both. Outputs in $OUT/tls/;
# `loadgen report` makes section 8 of results.md from them.
#   1. Clients to the gateway: a gateway serving ws:// and one serving wss:// itself
#      (TLS_CERT_FILE / TLS_KEY_FILE, a certificate from a CA made here with openssl, which the
#      load generator trusts with --ca-file), one multiplexer, the shared Kafka and Postgres; the
#      same fixed-rate load on each: CPU per message of every process, delivered and receipt
#      latency. Then a connect storm on a fresh gateway per trial: CPU per connect, connects per
#      second, memory per idle connection.
#      Each pipeline is warmed up first (5 s at the rate, not reported). Kafka and Postgres may be
#      busy with other work on the machine: their CPU over 3 s right before each trial is
#      measured too, and the report gives their CPU net of that as well.
#   2. Services to Kafka and Postgres: the same load on a gateway and a multiplexer that reach
#      the secured broker (kafka.sh start --secure: SASL_SSL on 127.0.0.1:9094, each service as
#      its own user, the deployment's ACLs) and the secured Postgres (postgres.sh start
#      --secure: verify-full, the gateway as chat_reader, the multiplexer as chat_writer),
#      against a pair on the plain broker and Postgres of `make stack`. The secured instances
#      are started if they are not running, and then stopped again; this run's topics and
#      databases on them are deleted at the end (its ACLs stay: the script only creates them).
#
# Env: BENCH_TLS_RATE      messages per second of the fixed-rate trials (default 2000)
#      BENCH_TLS_SECONDS   length of each (default 30; 6 with BENCH_QUICK=1)
#      BENCH_TLS_USERS     users of the fixed-rate trials (default 1000; 200 with BENCH_QUICK=1)
#      BENCH_TLS_CONNECTS  users of each connect storm (default 2000; 500 with BENCH_QUICK=1)
#      BENCH_TLS_CONCURRENCY connects in progress at once in the storm (default 64)
#      BENCH_TLS_KEY       rsa (RSA-2048, default) or ec (ECDSA P-256): the gateway's key
#      BENCH_TLS_SERVICES  0: skip part 2 (the secured broker and Postgres)

TLS_DIR="$OUT/tls"
TLS_PREFIX="${PREFIX}tls-"  # part 1's topics on the shared broker (deleted with the run's prefix)
SVP_PREFIX="${PREFIX}svp-"  # part 2, plain: the shared broker
SEC_PREFIX="${PREFIX}sec-"  # part 2, TLS: the secured broker
SEC_BROKERS="127.0.0.1:${KAFKA_SECURE_PORT:-9094}"
SEC_PG_PORT=54321
SEC_KAFKA_STATE="$STATE_DIR/kafka-secure"
SEC_PG_CA="$STATE_DIR/pg-secure-tls/ca.crt"
SEC_PG_USERS="$STATE_DIR/pg-secure-users"
SEC_DBS=()
SEC_TOPICS=0 SEC_KAFKA_STARTED=0 SEC_PG_STARTED=0

# A CA and a server certificate for 127.0.0.1 and localhost, signed by it: $1/ca.crt (what the
# load generator trusts), $1/server.crt, $1/server.key (PKCS#8).
tls_certs() { # dir rsa|ec
  local dir="$1" newkey=(-newkey rsa:2048)
  if [[ "$2" == ec ]]; then newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1); fi
  mkdir -p "$dir"
  openssl req -x509 "${newkey[@]}" -nodes -days 2 -subj "/CN=chat bench CA $RUN_ID" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req "${newkey[@]}" -nodes -subj "/CN=127.0.0.1" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1,DNS:localhost" >"$dir/server.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/server.ext" -out "$dir/server.crt" 2>/dev/null
  openssl verify -CAfile "$dir/ca.crt" "$dir/server.crt" >/dev/null || die "tls: the certificate made does not verify"
}

# What the shared processes (Kafka, Postgres: the --watch arguments) use while the pipeline
# idles, right before a trial: other work on the machine, which the report takes off.
tls_idle() { # name watches...
  local name="$1"
  shift
  "$BIN/loadgen" idle --seconds "$TLS_IDLE_SECONDS" "$@" --out "$TLS_DIR/idle-$name.json" >>"$OUT/logs/tls-idle.log" 2>&1 \
    || echo "bench: tls: measuring the idle CPU before $name failed" >&2
}

# One fixed-rate trial (loadgen run): out_dir url gateway_pid multiplexer_pid user_prefix
# kafka_and_postgres_watches...; the idle CPU of those right before it.
tls_trial() {
  local dir="$1" url="$2" gw="$3" mx="$4" users="$5"
  shift 5
  tls_idle "$(basename "$dir")" "$@"
  "$BIN/loadgen" --ca-file "$TLS_DIR/ca.crt" run --url "$url" --users "$TLS_USERS" --source-ips "$SOURCE_IPS" \
    --user-prefix "$users" --rate "$TLS_RATE" --seconds "$TLS_SECONDS" --out-dir "$dir" \
    --watch loadgen=self --watch "gateway=$gw" --watch "multiplexer=$mx" "$@" \
    || echo "bench: tls: the trial in $dir failed" >&2
}

# A short trial at the same rate on a pipeline just started, not reported: connection pools
# filled, a broker's JIT warm, before the first measured trial.
tls_warmup() { # name url user_prefix
  "$BIN/loadgen" --ca-file "$TLS_DIR/ca.crt" run --url "$2" --users "$TLS_USERS" --source-ips "$SOURCE_IPS" \
    --user-prefix "$3" --rate "$TLS_RATE" --seconds "$TLS_WARMUP_SECONDS" --out-dir "$TLS_DIR/warmup-$1" \
    >>"$OUT/logs/tls-warmup.log" 2>&1 || echo "bench: tls: the warm-up $1 failed (see $OUT/logs/tls-warmup.log)" >&2
}

# The order of the trials: plain and TLS alternated, so that drift falls on both.
TLS_ORDER=(plain tls tls plain)

tls_clients() {
  local plain_port tls_port mx_port i mode url gw
  log "tls: clients to the gateway: ws:// and wss:// ($TLS_KEY_LABEL), $TLS_USERS users at $TLS_RATE msg/s for $TLS_SECONDS s, ${TLS_ORDER[*]}"
  "$BIN/chatctl" topics --brokers "$BROKERS" --prefix "$TLS_PREFIX" --gateways lgt1,lgt2,lgt3 >>"$OUT/logs/topics.log"
  GROUPS_TO_DELETE+=("${TLS_PREFIX}multiplexer" "${TLS_PREFIX}gateway-lgt1" "${TLS_PREFIX}gateway-lgt2" "${TLS_PREFIX}gateway-lgt3")
  create_dbs tls
  local dsns="$DSNS"
  plain_port="$(free_port 18550)"
  # shellcheck disable=SC2046
  start_bg tls-plain "$OUT/logs/tls-plain.log" env $(GW_DSNS="$dsns" GW_TOPIC_PREFIX="$TLS_PREFIX" gateway_env lgt1 "$plain_port") \
    "$BIN/gateway"
  wait_ready "$(gateway_ops "$plain_port")/readyz" tls-plain
  tls_port="$(free_port $((plain_port + 1)))"
  # shellcheck disable=SC2046
  start_bg tls-tls "$OUT/logs/tls-tls.log" env $(GW_DSNS="$dsns" GW_TOPIC_PREFIX="$TLS_PREFIX" gateway_env lgt2 "$tls_port") \
    TLS_CERT_FILE="$TLS_DIR/server.crt" TLS_KEY_FILE="$TLS_DIR/server.key" "$BIN/gateway"
  wait_ready "$(gateway_ops "$tls_port")/readyz" tls-tls
  mx_port="$(free_port 18559)"
  # shellcheck disable=SC2086
  start_bg tls-mx "$OUT/logs/tls-mx.log" env TOPIC_PREFIX="$TLS_PREFIX" KAFKA_BROKERS="$BROKERS" \
    SHARD_DSNS="$dsns" SHARD_POOL_SIZE=4 MULTIPLEXER_GROUP="${TLS_PREFIX}multiplexer" \
    MULTIPLEXER_HTTP_ADDR="127.0.0.1:$mx_port" RUST_LOG=warn ${BENCH_MULTIPLEXER_ENV:-} "$BIN/multiplexer"
  wait_ready "http://127.0.0.1:$mx_port/readyz" tls-mx
  log "tls: clients: warming up ($TLS_WARMUP_SECONDS s on each gateway)"
  tls_warmup clients-plain "ws://127.0.0.1:$plain_port" "${RUN_ID}tw1"
  tls_warmup clients-tls "wss://127.0.0.1:$tls_port" "${RUN_ID}tw2"
  i=0
  for mode in "${TLS_ORDER[@]}"; do
    i=$((i + 1))
    if [[ "$mode" == tls ]]; then url="wss://127.0.0.1:$tls_port"; gw="${PIDS[tls-tls]}"
    else url="ws://127.0.0.1:$plain_port"; gw="${PIDS[tls-plain]}"; fi
    log "tls: clients, trial $i of ${#TLS_ORDER[@]}: $mode ($url)"
    tls_trial "$TLS_DIR/clients-$i-$mode" "$url" "$gw" "${PIDS[tls-mx]}" "${RUN_ID}t$i" "${KAFKA_W[@]}" "${PG_W[@]}"
  done
  stop_bg tls-mx
  stop_bg tls-tls
  stop_bg tls-plain

  log "tls: connect storm: $TLS_CONNECTS users, $TLS_CONCURRENCY at a time, a fresh gateway per trial"
  local plan=(--users "$TLS_CONNECTS" --user-prefix "${RUN_ID}ts" --conversations 4 --pending-conversations 1
    --pending-messages 1 --receipt-conversations 1)
  create_dbs tlsst
  local storm_dsns="$DSNS"
  "$BIN/loadgen" storm-seed --dsns "$storm_dsns" "${plan[@]}" --out "$TLS_DIR/storm-seed.json" >>"$OUT/logs/tls-storm-seed.log" 2>&1 \
    || die "tls: seeding the storm's shards failed (see $OUT/logs/tls-storm-seed.log)"
  if "$BIN/db-writer" rebuild-index --help >/dev/null 2>&1; then
    SHARD_DSNS="$storm_dsns" "$BIN/db-writer" rebuild-index >>"$OUT/logs/tls-storm-seed.log" 2>&1 \
      || die "tls: db-writer rebuild-index failed (see $OUT/logs/tls-storm-seed.log)"
  fi
  for dsn in ${storm_dsns//,/ }; do psql -q "$dsn" -c 'VACUUM ANALYZE' -c 'CHECKPOINT' >>"$OUT/logs/tls-storm-seed.log" 2>&1; done
  i=0
  local port tls_env
  for mode in "${TLS_ORDER[@]}"; do
    i=$((i + 1))
    port="$(free_port 18560)"
    tls_env=""
    if [[ "$mode" == tls ]]; then tls_env="TLS_CERT_FILE=$TLS_DIR/server.crt TLS_KEY_FILE=$TLS_DIR/server.key"; url="wss://127.0.0.1:$port"
    else url="ws://127.0.0.1:$port"; fi
    # shellcheck disable=SC2046,SC2086
    start_bg tls-storm "$OUT/logs/tls-storm-$i-$mode.log" env $(GW_DSNS="$storm_dsns" GW_TOPIC_PREFIX="$TLS_PREFIX" gateway_env lgt3 "$port") \
      $tls_env "$BIN/gateway"
    wait_ready "$(gateway_ops "$port")/readyz" tls-storm
    sleep 2
    log "tls: connect storm, trial $i of ${#TLS_ORDER[@]}: $mode ($url)"
    tls_idle "storm-$i-$mode" "${KAFKA_W[@]}" "${PG_W[@]}"
    "$BIN/loadgen" --ca-file "$TLS_DIR/ca.crt" storm --url "$url" "${plan[@]}" --source-ips "$SOURCE_IPS" \
      --concurrency "$TLS_CONCURRENCY" --target-pid "${PIDS[tls-storm]}" --dsns "$storm_dsns" --label "$mode" \
      --settle-seconds 3 --idle-seconds "$TLS_STORM_IDLE" \
      --watch loadgen=self --watch "gateway=${PIDS[tls-storm]}" "${KAFKA_W[@]}" "${PG_W[@]}" \
      --out "$TLS_DIR/storm-$i-$mode.json" || echo "bench: tls: the storm ($mode) failed" >&2
    stop_bg tls-storm
  done
}

# ---------------------------------------------------------------- part 2: the secured broker and Postgres
sec_password() { cat "$SEC_KAFKA_STATE/users/$1"; }
sec_kafka_env() { # user: the settings of a client of the secured broker
  echo KAFKA_BROKERS="$SEC_BROKERS" KAFKA_SECURITY_PROTOCOL=sasl_ssl KAFKA_CA_FILE="$SEC_KAFKA_STATE/tls/ca.crt" \
    KAFKA_SASL_MECHANISM=SCRAM-SHA-512 KAFKA_SASL_USERNAME="$1" KAFKA_SASL_PASSWORD="$(sec_password "$1")"
}
sec_pg_dsn() { # role db
  echo "postgres://$1:$(cat "$SEC_PG_USERS/$1")@127.0.0.1:$SEC_PG_PORT/$2?sslmode=verify-full&sslrootcert=$SEC_PG_CA"
}

# Deletes what part 2 made on the secured instances and stops those it started (bench.sh's
# cleanup calls it too, on failure or Ctrl-C).
tls_cleanup() {
  local db try
  if ((SEC_TOPICS)); then
    # shellcheck disable=SC2046
    env $(sec_kafka_env admin) "$BIN/loadgen" cleanup --topic-prefix "$SEC_PREFIX" \
      --group "${SEC_PREFIX}multiplexer" --group "${SEC_PREFIX}gateway-gw1" >>"$OUT/logs/cleanup.log" 2>&1 \
      || echo "bench: tls: deleting the topics on the secured broker failed (see $OUT/logs/cleanup.log)" >&2
    SEC_TOPICS=0
  fi
  for db in "${SEC_DBS[@]}"; do
    # The owner may not end other roles' sessions (FORCE): it waits for them to close.
    for try in 1 2 3 4 5 6 7 8 9 10; do
      psql -q "$(sec_pg_dsn chat_owner postgres)" -c "DROP DATABASE IF EXISTS \"$db\"" >>"$OUT/logs/cleanup.log" 2>&1 && break
      ((try < 10)) || echo "bench: tls: dropping $db on the secured Postgres failed" >&2
      sleep 1
    done
  done
  SEC_DBS=()
  if ((SEC_KAFKA_STARTED)); then infra/scripts/kafka.sh stop --secure >>"$OUT/logs/cleanup.log" 2>&1 || true; SEC_KAFKA_STARTED=0; fi
  if ((SEC_PG_STARTED)); then infra/scripts/postgres.sh stop --secure >>"$OUT/logs/cleanup.log" 2>&1 || true; SEC_PG_STARTED=0; fi
}

# Why part 2 cannot run here, or nothing.
tls_services_missing() {
  [[ "${BENCH_TLS_SERVICES:-1}" == 0 ]] && { echo "BENCH_TLS_SERVICES=0"; return; }
  command -v java >/dev/null || [[ -n "${JAVA_HOME:-}" ]] || { echo "no Java for the secured broker (make deps)"; return; }
  true
}

tls_services() {
  local i mode db dsn sec_kafka_pid sec_pg_pid
  log "tls: services to Kafka and Postgres: the secured broker ($SEC_BROKERS) and Postgres (127.0.0.1:$SEC_PG_PORT) against make stack's"
  if ! infra/scripts/kafka.sh status --secure >/dev/null 2>&1; then
    SEC_KAFKA_STARTED=1
    infra/scripts/kafka.sh start --secure >>"$OUT/logs/tls-secure-start.log" 2>&1 \
      || die "tls: starting the secured broker failed (see $OUT/logs/tls-secure-start.log)"
  fi
  if ! infra/scripts/postgres.sh status --secure >/dev/null 2>&1; then
    SEC_PG_STARTED=1
    infra/scripts/postgres.sh start --secure >>"$OUT/logs/tls-secure-start.log" 2>&1 \
      || die "tls: starting the secured Postgres failed (see $OUT/logs/tls-secure-start.log)"
  fi
  sec_kafka_pid="$(ss -ltnpH "sport = :${SEC_BROKERS##*:}" | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2)"
  sec_pg_pid="$(ss -ltnpH "sport = :$SEC_PG_PORT" | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2)"
  [[ -n "$sec_kafka_pid" && -n "$sec_pg_pid" ]] || die "tls: cannot find the secured broker's or Postgres's pid"

  # The secured side: topics (as admin) and the deployment's ACLs for this prefix; shard
  # databases made by the owner, with the others' grants, migrated by the owner.
  SEC_TOPICS=1
  # shellcheck disable=SC2046
  env $(sec_kafka_env admin) "$BIN/loadgen" topics --topic-prefix "$SEC_PREFIX" --gateways gw1 >>"$OUT/logs/topics.log" \
    || die "tls: creating topics on the secured broker failed"
  CHATCTL="$BIN/chatctl" infra/scripts/kafka-acls.sh --prefix "$SEC_PREFIX" --gateways gw1 >>"$OUT/logs/tls-acls.log" 2>&1 \
    || die "tls: creating ACLs failed (see $OUT/logs/tls-acls.log)"
  local grants owner_dsns="" writer_dsns="" reader_dsns=""
  grants="$(infra/scripts/postgres.sh grants-sql --secure)"
  for ((i = 0; i < 4; i++)); do
    db="${RUN_ID}_sec$i"
    psql -q "$(sec_pg_dsn chat_owner postgres)" -c "CREATE DATABASE \"$db\"" >/dev/null || die "tls: CREATE DATABASE $db failed"
    SEC_DBS+=("$db")
    psql -q "$(sec_pg_dsn chat_owner "$db")" -c "$grants" >>"$OUT/logs/migrate.log" || die "tls: the grants in $db failed"
    owner_dsns+="${owner_dsns:+,}$(sec_pg_dsn chat_owner "$db")"
    writer_dsns+="${writer_dsns:+,}$(sec_pg_dsn chat_writer "$db")"
    reader_dsns+="${reader_dsns:+,}$(sec_pg_dsn chat_reader "$db")"
  done
  SHARD_DSNS="$owner_dsns" "$BIN/db-writer" migrate >>"$OUT/logs/migrate.log" 2>&1 || die "tls: migrating the secured shards failed"
  # The plain side: topics and shards of its own on make stack's.
  "$BIN/chatctl" topics --brokers "$BROKERS" --prefix "$SVP_PREFIX" --gateways gw1 >>"$OUT/logs/topics.log"
  GROUPS_TO_DELETE+=("${SVP_PREFIX}multiplexer" "${SVP_PREFIX}gateway-gw1")
  create_dbs svp
  local plain_dsns="$DSNS"

  local pp sp pmx smx
  pp="$(free_port 18570)"
  # shellcheck disable=SC2046
  start_bg svc-plain-gw "$OUT/logs/svc-plain-gw.log" env $(GW_DSNS="$plain_dsns" GW_TOPIC_PREFIX="$SVP_PREFIX" gateway_env gw1 "$pp") \
    "$BIN/gateway"
  wait_ready "$(gateway_ops "$pp")/readyz" svc-plain-gw
  sp="$(free_port $((pp + 1)))"
  # shellcheck disable=SC2046
  start_bg svc-tls-gw "$OUT/logs/svc-tls-gw.log" env $(GW_DSNS="$reader_dsns" GW_TOPIC_PREFIX="$SEC_PREFIX" gateway_env gw1 "$sp") \
    $(sec_kafka_env gateway-gw1) "$BIN/gateway"
  wait_ready "$(gateway_ops "$sp")/readyz" svc-tls-gw
  pmx="$(free_port 18578)"
  # shellcheck disable=SC2086
  start_bg svc-plain-mx "$OUT/logs/svc-plain-mx.log" env TOPIC_PREFIX="$SVP_PREFIX" KAFKA_BROKERS="$BROKERS" \
    SHARD_DSNS="$plain_dsns" SHARD_POOL_SIZE=4 MULTIPLEXER_GROUP="${SVP_PREFIX}multiplexer" \
    MULTIPLEXER_HTTP_ADDR="127.0.0.1:$pmx" RUST_LOG=warn ${BENCH_MULTIPLEXER_ENV:-} "$BIN/multiplexer"
  wait_ready "http://127.0.0.1:$pmx/readyz" svc-plain-mx
  smx="$(free_port $((pmx + 1)))"
  # shellcheck disable=SC2046,SC2086
  start_bg svc-tls-mx "$OUT/logs/svc-tls-mx.log" env TOPIC_PREFIX="$SEC_PREFIX" $(sec_kafka_env multiplexer) \
    SHARD_DSNS="$writer_dsns" SHARD_POOL_SIZE=4 MULTIPLEXER_MIGRATE=false MULTIPLEXER_GROUP="${SEC_PREFIX}multiplexer" \
    MULTIPLEXER_HTTP_ADDR="127.0.0.1:$smx" RUST_LOG=warn ${BENCH_MULTIPLEXER_ENV:-} "$BIN/multiplexer"
  wait_ready "http://127.0.0.1:$smx/readyz" svc-tls-mx
  log "tls: services: warming up ($TLS_WARMUP_SECONDS s on each pipeline)"
  tls_warmup services-plain "ws://127.0.0.1:$pp" "${RUN_ID}vw1"
  tls_warmup services-tls "ws://127.0.0.1:$sp" "${RUN_ID}vw2"
  i=0
  for mode in "${TLS_ORDER[@]}"; do
    i=$((i + 1))
    log "tls: services, trial $i of ${#TLS_ORDER[@]}: $mode"
    if [[ "$mode" == tls ]]; then
      tls_trial "$TLS_DIR/services-$i-$mode" "ws://127.0.0.1:$sp" "${PIDS[svc-tls-gw]}" "${PIDS[svc-tls-mx]}" "${RUN_ID}v$i" \
        --watch "kafka=$sec_kafka_pid" --watch "postgres=$sec_pg_pid+"
    else
      tls_trial "$TLS_DIR/services-$i-$mode" "ws://127.0.0.1:$pp" "${PIDS[svc-plain-gw]}" "${PIDS[svc-plain-mx]}" "${RUN_ID}v$i" \
        "${KAFKA_W[@]}" "${PG_W[@]}"
    fi
  done
  for p in svc-tls-mx svc-plain-mx svc-tls-gw svc-plain-gw; do stop_bg "$p"; done
  tls_cleanup
}

tls_stage() {
  local t0=$SECONDS missing
  TLS_RATE="${BENCH_TLS_RATE:-2000}"
  TLS_SECONDS="${BENCH_TLS_SECONDS:-$([[ "$QUICK" == 1 ]] && echo 6 || echo 30)}"
  TLS_USERS="${BENCH_TLS_USERS:-$([[ "$QUICK" == 1 ]] && echo 200 || echo 1000)}"
  TLS_CONNECTS="${BENCH_TLS_CONNECTS:-$([[ "$QUICK" == 1 ]] && echo 500 || echo 2000)}"
  TLS_CONCURRENCY="${BENCH_TLS_CONCURRENCY:-64}"
  TLS_STORM_IDLE="$([[ "$QUICK" == 1 ]] && echo 2 || echo 12)"
  TLS_WARMUP_SECONDS="$([[ "$QUICK" == 1 ]] && echo 2 || echo 5)"
  TLS_IDLE_SECONDS="$([[ "$QUICK" == 1 ]] && echo 1 || echo 3)"
  case "${BENCH_TLS_KEY:-rsa}" in
    rsa) TLS_KEY_LABEL="an RSA-2048" ;;
    ec) TLS_KEY_LABEL="an ECDSA P-256" ;;
    *) die "BENCH_TLS_KEY: rsa or ec, not '${BENCH_TLS_KEY}'" ;;
  esac
  command -v openssl >/dev/null || die "tls: openssl is needed to make the certificates (make deps)"
  tls_certs "$TLS_DIR" "${BENCH_TLS_KEY:-rsa}"
  missing="$(tls_services_missing)"
  local skipped=""
  if [[ -n "$missing" ]]; then skipped=", \"services_skipped\": \"$missing\""; fi
  cat >"$TLS_DIR/setup.json" <<EOF
{"users": $TLS_USERS, "rate": $TLS_RATE, "seconds": $TLS_SECONDS, "key": "$TLS_KEY_LABEL",
 "storm_idle_seconds": $((TLS_STORM_IDLE + 3))$skipped}
EOF
  tls_clients
  if [[ -z "$missing" ]]; then tls_services; else log "tls: services part skipped: $missing"; fi
  log "tls: done in $((SECONDS - t0)) s"
}

tls_stage
