#!/usr/bin/env bash
# Usage: kafka.sh start|stop|status|wait|reset|bootstrap [--cluster|--secure]
#        kafka.sh start-node|stop-node|kill-node N --cluster
#
# Local Kafka (KRaft only, combined broker+controller nodes), for dev/tests.
#   default   : 1 node,  PLAINTEXT 127.0.0.1:9092, controller 127.0.0.1:9093,
#               state in <state>/kafka/{server.properties,kafka.log,kafka.pid,data/}
#   --cluster : 3 nodes, PLAINTEXT 127.0.0.1:19092-19094, controllers
#               127.0.0.1:19192-19194, state in <state>/kafka-cluster/node-N/,
#               RF 3 / min.insync.replicas 2 / no unclean election.
#   --secure  : 1 node, SASL_SSL (SCRAM-SHA-512) 127.0.0.1:9094 only, controller
#               127.0.0.1:9095 (loopback, not advertised), ACLs enforced
#               (StandardAuthorizer, nothing allowed without an ACL), state in
#               <state>/kafka-secure/. On first start it makes a CA and the
#               broker's certificate (tls/ca.crt is what clients trust) and one
#               SCRAM user per service with a random password (users/<name>:
#               admin, the super user; gateway-gw1, gateway-gw2, multiplexer, data). ACLs for a
#               deployment: infra/scripts/kafka-acls.sh.
#   (<state> = <repo>/.local unless CHAT_STATE_DIR is set)
#
#   start      start (formatting storage on first use) and return once every
#              node accepts connections and logged "Kafka Server started";
#              already running nodes are left alone
#   stop       SIGTERM, wait for exit, SIGKILL after KAFKA_STOP_TIMEOUT s
#   status     one line per node; exit 0 iff all nodes are running and ready
#   wait       wait until running nodes are ready (fails if none running)
#   reset      stop and delete the data (next start formats a new cluster)
#   bootstrap  print the bootstrap servers string
#   start-node N / stop-node N / kill-node N (SIGKILL)   (cluster only, N=1..3)
#
# Env:
#   KAFKA_HOME            use $KAFKA_HOME/libs instead of the pinned jars
#   CHAT_STATE_DIR        state dir (default <repo>/.local)
#   JAVA_HOME             java to use (default: java on PATH)
#   KAFKA_HEAP_OPTS       default "-Xms512m -Xmx512m"
#   KAFKA_JVM_OPTS        extra JVM options for the broker
#   KAFKA_EXTRA_PROPS     extra server.properties lines ("k=v" separated by
#                         newlines or spaces); they override the defaults
#   KAFKA_PORT, KAFKA_CONTROLLER_PORT  single-node ports (default 9092, 9093;
#                         use with CHAT_STATE_DIR to run a second instance)
#   KAFKA_START_TIMEOUT   seconds (default 90)
#   KAFKA_STOP_TIMEOUT    seconds before SIGKILL (default 30)
#   KAFKA_CDS=0           do not use/create the AppCDS archive (faster JVM start)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { print_help | sed -n 1,2p >&2; exit 2; }

cmd="" node_arg="" cluster=0 secure=0
for a in "$@"; do
  case "$a" in
    --cluster) cluster=1 ;;
    --secure) secure=1 ;;
    -h|--help) print_help; exit 0 ;;
    -*) die "unknown option '$a'" ;;
    *)
      if [[ -z "$cmd" ]]; then cmd="$a"
      elif [[ -z "$node_arg" ]]; then node_arg="$a"
      else die "unexpected argument '$a'"; fi ;;
  esac
done
[[ -n "$cmd" ]] || usage
[[ $cluster -eq 1 && $secure -eq 1 ]] && die "--cluster and --secure do not go together"

START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

if [[ $cluster -eq 1 ]]; then
  BASE="$STATE_DIR/kafka-cluster"
  NODES=(1 2 3)
elif [[ $secure -eq 1 ]]; then
  BASE="$STATE_DIR/kafka-secure"
  NODES=(1)
else
  BASE="$STATE_DIR/kafka"
  NODES=(1)
fi

node_dir() { if [[ $cluster -eq 1 ]]; then echo "$BASE/node-$1"; else echo "$BASE"; fi; }
broker_port() {
  if [[ $cluster -eq 1 ]]; then echo $((19091 + $1))
  elif [[ $secure -eq 1 ]]; then echo "${KAFKA_SECURE_PORT:-9094}"
  else echo "${KAFKA_PORT:-9092}"; fi
}
ctrl_port() {
  if [[ $cluster -eq 1 ]]; then echo $((19191 + $1))
  elif [[ $secure -eq 1 ]]; then echo "${KAFKA_SECURE_CONTROLLER_PORT:-9095}"
  else echo "${KAFKA_CONTROLLER_PORT:-9093}"; fi
}
conf_of() { echo "$(node_dir "$1")/server.properties"; }
pidf_of() { echo "$(node_dir "$1")/kafka.pid"; }
log_of() { echo "$(node_dir "$1")/kafka.log"; }
label() {
  if [[ $cluster -eq 1 ]]; then echo "kafka node $1"
  elif [[ $secure -eq 1 ]]; then echo "kafka (secure)"
  else echo "kafka"; fi
}
listener() { if [[ $secure -eq 1 ]]; then echo SASL_SSL; else echo PLAINTEXT; fi; }

# --- The secured broker's CA, certificate and users (made once, kept with its data). ---
SECURE_USERS=(admin gateway-gw1 gateway-gw2 multiplexer data)
password_of() { cat "$BASE/users/$1"; }
secure_prepare() {
  local tls="$BASE/tls" u
  mkdir -p "$tls" "$BASE/users"
  chmod 700 "$BASE/users" "$tls"
  for u in "${SECURE_USERS[@]}"; do
    [[ -s "$BASE/users/$u" ]] || head -c 18 /dev/urandom | base64 | tr '+/' '-_' >"$BASE/users/$u"
  done
  [[ -s "$tls/broker.p12" && -s "$tls/ca.crt" ]] && return 0
  command -v openssl >/dev/null 2>&1 || die "openssl is needed to make the secured broker's certificates"
  (
    cd "$tls"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=chat local CA" \
      -keyout ca.key -out ca.crt
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout broker.key -out broker.csr
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >broker.ext
    openssl x509 -req -in broker.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile broker.ext -out broker.crt
    openssl pkcs12 -export -in broker.crt -inkey broker.key -certfile ca.crt \
      -passout "pass:$(password_of admin)" -out broker.p12.tmp
    mv broker.p12.tmp broker.p12
    rm -f broker.csr broker.ext ca.srl
  ) >"$BASE/tls.log" 2>&1 || die "making the secured broker's certificates failed (see $BASE/tls.log)"
}

bootstrap() {
  local n out=""
  for n in "${NODES[@]}"; do out+="${out:+,}127.0.0.1:$(broker_port "$n")"; done
  echo "$out"
}

libs_dir() {
  if [[ -n "${KAFKA_HOME:-}" && -d "${KAFKA_HOME}/libs" ]]; then
    echo "$KAFKA_HOME/libs"
  else
    echo "$STATE_DIR/kafka-dist/libs"
  fi
}

# --- AppCDS (class-data sharing): cuts ~1.5 s off every broker start. ---
# The first run of a node dumps a dynamic archive at clean exit
# (-XX:ArchiveClassesAtExit); stop renames it into place and later starts map
# it (-XX:SharedArchiveFile). The archive name is keyed on the jars and the
# JVM, so a changed pin or a JDK upgrade simply produces a new one. The JVM
# ignores an unusable archive (-Xshare:auto). KAFKA_CDS=0 disables all this.
cds_dir() { echo "$STATE_DIR/kafka-dist/cds"; }
cds_key() {
  local real
  real="$(readlink -f "$(command -v "$JAVA")")"
  { ls -lL --time-style=+%s "$(libs_dir)/"; stat -c '%n %s %Y' "$real" \
      "$(dirname "$real")/../lib/server/libjvm.so" 2>/dev/null || true; } | sha256sum | cut -c1-16
}
cds_args=()
set_cds_args() { # set_cds_args N -> JVM flags for node N in cds_args[]
  cds_args=()
  [[ "${KAFKA_CDS:-1}" != 0 ]] || return 0
  local jsa
  jsa="$(cds_dir)/$(cds_key).jsa"
  mkdir -p "$(cds_dir)"
  if [[ -s "$jsa" ]]; then
    cds_args=("-XX:SharedArchiveFile=$jsa")
  else
    cds_args=("-XX:ArchiveClassesAtExit=$jsa.node$1")
  fi
  cds_args+=(-Xlog:cds=off -Xlog:cds+dynamic=off)
}
cds_collect() { # after node N exited cleanly: publish the archive it dumped
  local f g
  for f in "$(cds_dir)"/*.jsa.node"$1"; do
    [[ -s "$f" ]] || continue
    for g in "$(cds_dir)"/*.jsa; do [[ "$g" == "${f%.node"$1"}" ]] || rm -f "$g"; done
    mv -f "$f" "${f%.node"$1"}"
  done
}

# Prints the pid of node N when it is running (and really is our broker).
running_pid() {
  local pf pid
  pf="$(pidf_of "$1")"
  [[ -f "$pf" ]] || return 1
  pid="$(cat "$pf" 2>/dev/null || true)"
  if pid_alive "$pid" && pid_cmdline_has "$pid" "$(conf_of "$1")"; then
    echo "$pid"
    return 0
  fi
  return 1
}

is_ready() {
  local n="$1"
  port_open 127.0.0.1 "$(broker_port "$n")" && grep -qF "Kafka Server started" "$(log_of "$n")" 2>/dev/null
}

write_config() {
  local n="$1" d voters="" i rf=1 misr=1 conf tmp
  d="$(node_dir "$n")"
  for i in "${NODES[@]}"; do voters+="${voters:+,}$i@127.0.0.1:$(ctrl_port "$i")"; done
  [[ $cluster -eq 1 ]] && { rf=3; misr=2; }
  conf="$(conf_of "$n")"
  tmp="$conf.tmp"
  cat >"$tmp" <<EOF
# Generated by infra/scripts/kafka.sh on every start; edits are overwritten.
# Use KAFKA_EXTRA_PROPS to override settings.
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$voters
listeners=$(listener)://127.0.0.1:$(broker_port "$n"),CONTROLLER://127.0.0.1:$(ctrl_port "$n")
advertised.listeners=$(listener)://127.0.0.1:$(broker_port "$n")
listener.security.protocol.map=$(listener):$(listener),CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=$(listener)
log.dirs=$d/data

auto.create.topics.enable=false
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$misr
unclean.leader.election.enable=false
offsets.topic.replication.factor=$rf
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$misr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$misr
group.initial.rebalance.delay.ms=0

log.cleaner.enable=true
# default is 128 MB, too much for a 512 MB heap
log.cleaner.dedupe.buffer.size=33554432
num.network.threads=2
num.io.threads=4
EOF
  if [[ $cluster -eq 1 ]]; then
    # Faster failure detection for fault tests, and a cleanly stopped node can
    # re-register sooner (a restart within the session timeout of the old
    # registration gets DUPLICATE_BROKER_REGISTRATION until it expires).
    # Kafka defaults: 2000 / 9000.
    cat >>"$tmp" <<'EOF'
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000
EOF
  fi
  if [[ $secure -eq 1 ]]; then
    # Clients: TLS and SCRAM only. The controller listener stays on loopback in plaintext
    # (it is not advertised, and serves only the controller's own APIs); the broker reaches it
    # as ANONYMOUS, hence that principal among the super users.
    cat >>"$tmp" <<EOF
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(password_of admin)";
ssl.keystore.type=PKCS12
ssl.keystore.location=$BASE/tls/broker.p12
ssl.keystore.password=$(password_of admin)
ssl.key.password=$(password_of admin)
ssl.truststore.type=PEM
ssl.truststore.location=$BASE/tls/ca.crt
ssl.client.auth=none
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:admin;User:ANONYMOUS
EOF
  fi
  if [[ -n "${KAFKA_EXTRA_PROPS:-}" ]]; then
    echo "# KAFKA_EXTRA_PROPS" >>"$tmp"
    tr ' ' '\n' <<<"$KAFKA_EXTRA_PROPS" | sed '/^$/d' >>"$tmp"
  fi
  mv "$tmp" "$conf"
}

cluster_id() {
  local f="$BASE/cluster.id"
  # An id that starts with '-' (1 in 64 of them) reads as an option to kafka-storage, whose
  # format then fails ("--cluster-id: expected one argument"); Kafka's own random ids never
  # start with one. Such a file can only be left by a format that failed: made again.
  if [[ ! -s "$f" || "$(head -c 1 "$f")" == "-" ]]; then
    # Kafka cluster ids are 16 random bytes, base64url without padding.
    local id="-"
    while [[ "$id" == -* ]]; do
      id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    done
    printf '%s' "$id" >"$f.tmp"
    mv "$f.tmp" "$f"
  fi
  cat "$f"
}

format_if_needed() {
  local n="$1" d libs
  d="$(node_dir "$n")"
  # The secured broker's users are written when its storage is formatted: a broker formatted
  # with another list of users starts again from empty storage (it is a test broker).
  if [[ $secure -eq 1 && -f "$d/data/meta.properties" \
        && "$(cat "$BASE/users.list" 2>/dev/null)" != "${SECURE_USERS[*]}" ]]; then
    rm -rf "$d/data"
  fi
  [[ -f "$d/data/meta.properties" ]] && return 0
  libs="$(libs_dir)"
  mkdir -p "$d/data"
  # The secured broker's SCRAM users go into the metadata log as it is formatted.
  local scram=() u
  if [[ $secure -eq 1 ]]; then
    for u in "${SECURE_USERS[@]}"; do
      scram+=(--add-scram "SCRAM-SHA-512=[name=$u,password=$(password_of "$u")]")
    done
  fi
  if ! "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 \
      -Dlog4j2.configurationFile="$INFRA_DIR/kafka/tools-log4j2.properties" \
      -cp "$libs/*" kafka.tools.StorageTool format \
      --config "$(conf_of "$n")" --cluster-id "$(cluster_id)" --ignore-formatted \
      "${scram[@]}" >"$d/format.log" 2>&1; then
    die "$(label "$n"): storage format failed (see $d/format.log)"
  fi
  [[ $secure -eq 1 ]] && echo "${SECURE_USERS[*]}" >"$BASE/users.list"
  return 0
}

check_port_free() {
  local p="$1" n="$2"
  if port_open 127.0.0.1 "$p"; then
    die "$(label "$n"): port 127.0.0.1:$p is already in use by another process"
  fi
}

launch_node() {
  local n="$1" d pf log libs pid i
  if running_pid "$n" >/dev/null; then return 0; fi
  d="$(node_dir "$n")"; pf="$(pidf_of "$n")"; log="$(log_of "$n")"
  rm -f "$pf"
  check_port_free "$(broker_port "$n")" "$n"
  check_port_free "$(ctrl_port "$n")" "$n"
  mkdir -p "$d"
  [[ $secure -eq 1 ]] && secure_prepare
  write_config "$n"
  format_if_needed "$n"
  [[ -f "$log" ]] && mv -f "$log" "$log.prev"
  libs="$(libs_dir)"
  set_cds_args "$n"
  # setsid -f: own session, survives the caller's process group; the inner
  # bash writes its pid then execs java (same pid). 9>&-: do not leak the lock.
  # shellcheck disable=SC2086,SC2016
  setsid -f bash -c 'echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$pf" \
    "$JAVA" ${KAFKA_HEAP_OPTS:--Xms512m -Xmx512m} \
    -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Xshare:auto \
    -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$INFRA_DIR/kafka/log4j2.properties" \
    -Dkafka.logs.dir="$d" \
    "${cds_args[@]}" \
    ${KAFKA_JVM_OPTS:-} \
    -cp "$libs/*" kafka.Kafka "$(conf_of "$n")" \
    </dev/null >"$log" 2>&1 9>&-
  for ((i = 0; i < 100; i++)); do
    [[ -s "$pf" ]] && break
    sleep 0.05
  done
  pid="$(cat "$pf" 2>/dev/null || true)"
  pid_alive "$pid" || { tail_log "$log"; die "$(label "$n"): failed to launch (see $log)"; }
}

# wait_ready N... : until each node is ready, or fail with the log tail.
wait_ready() {
  local deadline n pending=("$@") still
  deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    still=()
    for n in "${pending[@]}"; do
      if ! running_pid "$n" >/dev/null; then
        tail_log "$(log_of "$n")"
        die "$(label "$n") exited during startup (see $(log_of "$n"))"
      fi
      is_ready "$n" || still+=("$n")
    done
    [[ ${#still[@]} -eq 0 ]] && return 0
    if ((SECONDS >= deadline)); then
      for n in "${still[@]}"; do tail_log "$(log_of "$n")" 30; done
      die "$(label "${still[0]}") not ready after ${START_TIMEOUT}s (still running; see $(log_of "${still[0]}"))"
    fi
    pending=("${still[@]}")
    sleep 0.2
  done
}

# stop_nodes SIGNAL N... : signal all, wait for exit, escalate to SIGKILL.
stop_nodes() {
  local sig="$1" n pid deadline alive
  shift
  local -A pids=()
  for n in "$@"; do
    if pid="$(running_pid "$n")"; then
      pids[$n]="$pid"
      kill "-$sig" "$pid" 2>/dev/null || true
    else
      rm -f "$(pidf_of "$n")"
    fi
  done
  [[ ${#pids[@]} -eq 0 ]] && return 0
  deadline=$((SECONDS + STOP_TIMEOUT))
  local killed=0
  while :; do
    alive=0
    for n in "${!pids[@]}"; do
      if pid_alive "${pids[$n]}"; then
        alive=1
      else
        rm -f "$(pidf_of "$n")"
        if [[ $killed -eq 0 && "$sig" != KILL ]]; then cds_collect "$n"; else rm -f "$(cds_dir)"/*.jsa.node"$n"; fi
        unset "pids[$n]"
      fi
    done
    [[ $alive -eq 0 ]] && return 0
    if ((SECONDS >= deadline)); then
      [[ $killed -eq 0 ]] || die "$(label "${!pids[*]}") still alive after SIGKILL"
      for n in "${!pids[@]}"; do
        [[ "$sig" == KILL ]] || echo "$SCRIPT_NAME: warning: $(label "$n") did not stop within ${STOP_TIMEOUT}s, sending SIGKILL" >&2
        kill -KILL "${pids[$n]}" 2>/dev/null || true
      done
      killed=1
      deadline=$((SECONDS + 10))
    fi
    sleep 0.1
  done
}

with_lock() {
  mkdir -p "$BASE"
  exec 9>"$BASE/.lock"
  # children get 9>&- so a broker never holds this lock; the timeout is a backstop
  flock -w 300 9 || die "another kafka.sh holds $BASE/.lock for 300s; giving up"
}

node_num() {
  [[ $cluster -eq 1 ]] || die "$cmd requires --cluster"
  [[ "$node_arg" =~ ^[1-3]$ ]] || die "$cmd needs a node number 1..3"
  echo "$node_arg"
}

[[ "$cmd" =~ ^(start-node|stop-node|kill-node)$ ]] || [[ -z "$node_arg" ]] || die "unexpected argument '$node_arg'"

case "$cmd" in
  start)
    "$INFRA_SCRIPTS_DIR/install-kafka.sh"
    with_lock
    for n in "${NODES[@]}"; do launch_node "$n"; done
    wait_ready "${NODES[@]}"
    ;;
  start-node)
    n="$(node_num)"
    "$INFRA_SCRIPTS_DIR/install-kafka.sh"
    with_lock
    launch_node "$n"
    wait_ready "$n"
    ;;
  stop)
    with_lock
    stop_nodes TERM "${NODES[@]}"
    ;;
  stop-node)
    n="$(node_num)"
    with_lock
    stop_nodes TERM "$n"
    ;;
  kill-node)
    n="$(node_num)"
    with_lock
    STOP_TIMEOUT=5
    stop_nodes KILL "$n"
    ;;
  wait)
    up=()
    for n in "${NODES[@]}"; do running_pid "$n" >/dev/null && up+=("$n"); done
    [[ ${#up[@]} -gt 0 ]] || die "kafka$([[ $cluster -eq 1 ]] && echo ' cluster') is not running"
    wait_ready "${up[@]}"
    ;;
  status)
    rc=0
    for n in "${NODES[@]}"; do
      if pid="$(running_pid "$n")"; then
        if is_ready "$n"; then st="ready"; else st="starting"; rc=3; fi
        echo "$(label "$n"): running pid $pid, $(listener) 127.0.0.1:$(broker_port "$n"), controller 127.0.0.1:$(ctrl_port "$n"), $st"
      else
        echo "$(label "$n"): stopped"
        rc=3
      fi
    done
    exit $rc
    ;;
  reset)
    with_lock
    stop_nodes TERM "${NODES[@]}"
    for n in "${NODES[@]}"; do rm -rf "$(node_dir "$n")/data"; done
    rm -f "$BASE/cluster.id"
    ;;
  bootstrap)
    bootstrap
    ;;
  *) usage ;;
esac
