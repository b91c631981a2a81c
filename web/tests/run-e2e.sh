#!/usr/bin/env bash
# Usage: web/tests/run-e2e.sh [node --test args...]
#
# Runs the browser test (web/tests/e2e.test.mjs) against its own slice of the real stack, then
# tears that slice down:
#   - topics <P>-inbound, <P>-presence, <P>-outbound-webgw1, <P>-outbound-webgw2 (chatctl topics)
#   - two fresh shard databases <P>_s0 and <P>_s1 (created with psql)
#   - a multiplexer (RETENTION from the environment) and two gateways, webgw1 and webgw2,
#     on free loopback ports, serving this web/ directory
#   - a third gateway, webgw3, serving TLS (https://, wss://) with a certificate made here for
#     127.0.0.1 by a CA made here (openssl; nothing is kept)
# where <P> is a random prefix, so runs never see each other's data and can run in parallel.
# Kafka (127.0.0.1:9092) and Postgres (127.0.0.1:54320) must be up: `make stack`, or
# infra/scripts/kafka.sh start && infra/scripts/postgres.sh start.
#
# Env:
#   RETENTION       keep (default) | delete-on-ack
#   BIN_DIR         where chatctl, gateway and multiplexer are (default <repo>/target/debug)
#   KAFKA_BROKERS   default 127.0.0.1:9092
#   CHAT_TEST_PG    admin DSN (default postgres://chat@127.0.0.1:54320/postgres)
#   CHROMIUM        browser binary (default /usr/bin/chromium)
#   E2E_KEEP_TOPICS=1  leave the (prefixed) topics behind instead of deleting them
#   E2E_TESTS       test files to run (default tests/e2e.test.mjs)
# Artifacts (screenshots, service logs) go to web/test-artifacts/<retention>/.
set -euo pipefail

WEB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO="$(cd "$WEB_DIR/.." && pwd)"
BIN_DIR="${BIN_DIR:-$REPO/target/debug}"
RETENTION="${RETENTION:-keep}"
BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
ADMIN_PG="${CHAT_TEST_PG:-postgres://chat@127.0.0.1:54320/postgres}"
# shellcheck source=../../infra/scripts/lib.sh
source "$REPO/infra/scripts/lib.sh"
ART="$WEB_DIR/test-artifacts/$RETENTION"

case "$RETENTION" in keep|delete-on-ack) ;; *) echo "run-e2e: RETENTION must be keep or delete-on-ack" >&2; exit 2 ;; esac
for b in chatctl gateway multiplexer; do
  [[ -x "$BIN_DIR/$b" ]] || { echo "run-e2e: $BIN_DIR/$b is missing (cargo build --bins)" >&2; exit 2; }
done
command -v psql >/dev/null || { echo "run-e2e: psql is missing" >&2; exit 2; }
[[ -d "$WEB_DIR/node_modules/playwright-core" ]] || { echo "run-e2e: run web/tests/install.sh first" >&2; exit 2; }

P="webe2e$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
DBS=("${P}_s0" "${P}_s1")
DSNS="$(dsn_with_db "$ADMIN_PG" "${DBS[0]}"),$(dsn_with_db "$ADMIN_PG" "${DBS[1]}")"
mkdir -p "$ART"
rm -f "$ART"/*.log "$ART"/*.png
PIDS=()
CREATED_DBS=()
TOPICS_CREATED=0

log() { printf '[run-e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

free_port() {
  node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

cleanup() {
  local rc=$?
  set +e
  if ((${#PIDS[@]})); then
    log "stopping services"
    kill -TERM "${PIDS[@]}" 2>/dev/null
    local deadline=$((SECONDS + 20)) pid
    for pid in "${PIDS[@]}"; do
      while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS > deadline)); then kill -KILL "$pid" 2>/dev/null; break; fi
        sleep 0.1
      done
      wait "$pid" 2>/dev/null
    done
  fi
  # The run's test CA and key: nothing of them is kept.
  [[ -n "${TLS_DIR:-}" ]] && rm -rf "$TLS_DIR"
  local db
  for db in "${CREATED_DBS[@]}"; do
    psql -X -q "$ADMIN_PG" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 \
      || log "could not drop database $db"
  done
  if ((TOPICS_CREATED)) && [[ "${E2E_KEEP_TOPICS:-0}" != 1 ]]; then
    local libs="$REPO/.local/kafka-dist/libs"
    if [[ -d "$libs" ]] && command -v java >/dev/null; then
      java -Xmx256m -XX:TieredStopAtLevel=1 -cp "$libs/*" \
        -Dlog4j2.configurationFile="$REPO/infra/kafka/tools-log4j2.properties" \
        org.apache.kafka.tools.TopicCommand --bootstrap-server "$BROKERS" \
        --delete --topic "$P-.*" >/dev/null 2>&1 || log "could not delete topics $P-*"
      java -Xmx256m -XX:TieredStopAtLevel=1 -cp "$libs/*" \
        -Dlog4j2.configurationFile="$REPO/infra/kafka/tools-log4j2.properties" \
        org.apache.kafka.tools.consumer.group.ConsumerGroupCommand --bootstrap-server "$BROKERS" \
        --delete --group "$P-mux" --group "$P-gateway-webgw1" --group "$P-gateway-webgw2" --group "$P-gateway-webgw3" \
        >/dev/null 2>&1 || true
    else
      log "topics $P-* left behind (no Kafka CLI)"
    fi
  fi
  log "done (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "prefix $P, retention $RETENTION"
"$BIN_DIR/chatctl" topics --prefix "$P-" --gateways webgw1,webgw2,webgw3 --brokers "$BROKERS" >"$ART/chatctl.log" 2>&1 \
  || { cat "$ART/chatctl.log" >&2; exit 1; }
TOPICS_CREATED=1
for db in "${DBS[@]}"; do
  psql -X -q -v ON_ERROR_STOP=1 "$ADMIN_PG" -c "CREATE DATABASE \"$db\"" >/dev/null
  CREATED_DBS+=("$db")
done

MUX_PORT="$(free_port)"
GW1_PORT="$(free_port)"
GW2_PORT="$(free_port)"
while [[ "$GW1_PORT" == "$MUX_PORT" ]]; do GW1_PORT="$(free_port)"; done
while [[ "$GW2_PORT" == "$MUX_PORT" || "$GW2_PORT" == "$GW1_PORT" ]]; do GW2_PORT="$(free_port)"; done
# The gateways' operations listeners (/readyz, /metrics; GATEWAY_METRICS_ADDR).
GW1_OPS="$(free_port)"
while [[ " $MUX_PORT $GW1_PORT $GW2_PORT " == *" $GW1_OPS "* ]]; do GW1_OPS="$(free_port)"; done
GW2_OPS="$(free_port)"
while [[ " $MUX_PORT $GW1_PORT $GW2_PORT $GW1_OPS " == *" $GW2_OPS "* ]]; do GW2_OPS="$(free_port)"; done
GW3_PORT="$(free_port)"
while [[ " $MUX_PORT $GW1_PORT $GW2_PORT $GW1_OPS $GW2_OPS " == *" $GW3_PORT "* ]]; do GW3_PORT="$(free_port)"; done
GW3_OPS="$(free_port)"
while [[ " $MUX_PORT $GW1_PORT $GW2_PORT $GW1_OPS $GW2_OPS $GW3_PORT " == *" $GW3_OPS "* ]]; do GW3_OPS="$(free_port)"; done

# A CA and a server certificate for 127.0.0.1, made for this run.
TLS_DIR="$ART/tls"
rm -rf "$TLS_DIR" && mkdir -p "$TLS_DIR"
(
  cd "$TLS_DIR"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem \
    -days 2 -subj "/CN=web e2e CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout key.pem -out server.csr \
    -subj "/CN=127.0.0.1" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem -days 2 \
    -extfile server.ext 2>/dev/null
) || { log "cannot make the test certificate (openssl)"; exit 1; }

export KAFKA_BROKERS="$BROKERS" TOPIC_PREFIX="$P-" SHARD_DSNS="$DSNS" RUST_LOG="${RUST_LOG:-info}"

wait_ready() { # name url pid
  local deadline=$((SECONDS + 90))
  until curl -fsS -o /dev/null --max-time 2 "$2" 2>/dev/null; do
    if ! kill -0 "$3" 2>/dev/null; then
      log "$1 exited during start-up:"; tail -n 30 "$ART/$1.log" >&2; return 1
    fi
    if ((SECONDS > deadline)); then log "$1 not ready after 90 s"; tail -n 30 "$ART/$1.log" >&2; return 1; fi
    sleep 0.2
  done
  log "$1 ready ($2)"
}

# The multiplexer first: it applies the shard migrations the gateways read.
MULTIPLEXER_GROUP="$P-mux" RETENTION="$RETENTION" MULTIPLEXER_HTTP_ADDR="127.0.0.1:$MUX_PORT" \
  "$BIN_DIR/multiplexer" >"$ART/multiplexer.log" 2>&1 &
PIDS+=($!)
wait_ready multiplexer "http://127.0.0.1:$MUX_PORT/readyz" "${PIDS[-1]}"

start_gateway() { # id port ops-port [VAR=value...]
  local id="$1" port="$2" ops="$3"
  shift 3
  env GATEWAY_ID="$id" GATEWAY_ADDR="127.0.0.1:$port" GATEWAY_METRICS_ADDR="127.0.0.1:$ops" DEV_TOKENS=true \
    WEB_DIR="$WEB_DIR/public" "$@" "$BIN_DIR/gateway" >"$ART/$id.log" 2>&1 &
  PIDS+=($!)
}
start_gateway webgw1 "$GW1_PORT" "$GW1_OPS"
start_gateway webgw2 "$GW2_PORT" "$GW2_OPS"
start_gateway webgw3 "$GW3_PORT" "$GW3_OPS" TLS_CERT_FILE="$TLS_DIR/cert.pem" TLS_KEY_FILE="$TLS_DIR/key.pem"
wait_ready webgw1 "http://127.0.0.1:$GW1_OPS/readyz" "${PIDS[1]}"
wait_ready webgw2 "http://127.0.0.1:$GW2_OPS/readyz" "${PIDS[2]}"
wait_ready webgw3 "http://127.0.0.1:$GW3_OPS/readyz" "${PIDS[3]}"
curl -fsS -o /dev/null "http://127.0.0.1:$GW1_PORT/index.html" \
  || { log "gateway does not serve web/ (WEB_DIR): is target/debug/gateway up to date?"; exit 1; }

export E2E_GW1="http://127.0.0.1:$GW1_PORT" E2E_GW2="http://127.0.0.1:$GW2_PORT"
# The TLS gateway; node's own requests trust the test CA (the browser context of that test
# accepts the certificate it is shown).
export E2E_GW3="https://127.0.0.1:$GW3_PORT" NODE_EXTRA_CA_CERTS="$TLS_DIR/ca.pem"
export E2E_RETENTION="$RETENTION" E2E_ARTIFACTS="$ART" E2E_PREFIX="$P"
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
log "running the browser test against $E2E_GW1 and $E2E_GW2"
cd "$WEB_DIR"
# shellcheck disable=SC2086
node --test --test-reporter=spec --test-concurrency=1 "$@" ${E2E_TESTS:-tests/e2e.test.mjs}
