#!/usr/bin/env bash
# Usage: kafka-cli.sh <ClassSimpleName|fully.qualified.Class> [args...]
#
# Runs a Kafka CLI class with the pinned Kafka classpath (Kafka 4.1.1), e.g.
#   kafka-cli.sh TopicCommand --bootstrap-server 127.0.0.1:9092 --list
#   kafka-cli.sh TopicCommand --bootstrap-server 127.0.0.1:9092 --create \
#       --topic t --partitions 3 --replication-factor 1
#   kafka-cli.sh ConsumerGroupCommand --bootstrap-server 127.0.0.1:9092 --describe --all-groups
#   kafka-cli.sh ConsoleProducer --bootstrap-server 127.0.0.1:9092 --topic t
#   kafka-cli.sh ConsoleConsumer --bootstrap-server 127.0.0.1:9092 --topic t \
#       --from-beginning --max-messages 1
#   kafka-cli.sh MetadataQuorumCommand --bootstrap-server 127.0.0.1:9092 describe --status
#   kafka-cli.sh GetOffsetShell --bootstrap-server 127.0.0.1:9092 --topic t
# Simple names are looked up in the Kafka jars (org.apache.kafka.tools.* first,
# then kafka.*). Logs go to stderr at WARN; stdout is the tool's own output.
#
# Env: KAFKA_HOME, CHAT_STATE_DIR, JAVA_HOME (as kafka.sh),
#      KAFKA_CLI_JVM_OPTS (default "-Xmx256m -XX:TieredStopAtLevel=1")
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || { print_help >&2; exit 2; }
name="$1"
shift

if [[ -n "${KAFKA_HOME:-}" && -d "${KAFKA_HOME}/libs" ]]; then
  libs="$KAFKA_HOME/libs"
  idx="$STATE_DIR/kafka-home-classes.idx"
else
  "$INFRA_SCRIPTS_DIR/install-kafka.sh"
  libs="$STATE_DIR/kafka-dist/libs"
  idx="$STATE_DIR/kafka-dist/classes.idx"
fi

resolve() {
  local n="$1" hit
  case "$n" in
    *.*) echo "$n"; return 0 ;;
    # well-known names (Kafka 4.1), no jar scan needed
    TopicCommand|ConsoleProducer|BrokerApiVersionsCommand|MetadataQuorumCommand|ClusterTool|\
    GetOffsetShell|FeatureCommand|AclCommand|LogDirsCommand|LeaderElectionCommand|\
    DeleteRecordsCommand|TransactionsCommand|GroupsCommand|ProducerPerformance|\
    ConsumerPerformance|EndToEndLatency|VerifiableProducer|VerifiableConsumer|JmxTool|\
    ClientMetricsCommand|ReplicaVerificationTool)
      echo "org.apache.kafka.tools.$n"; return 0 ;;
    ConsoleConsumer|ConsoleShareConsumer) echo "org.apache.kafka.tools.consumer.$n"; return 0 ;;
    ConsumerGroupCommand|ShareGroupCommand) echo "org.apache.kafka.tools.consumer.group.$n"; return 0 ;;
    ReassignPartitionsCommand) echo "org.apache.kafka.tools.reassign.$n"; return 0 ;;
    StreamsGroupCommand) echo "org.apache.kafka.tools.streams.$n"; return 0 ;;
    StorageTool|DumpLogSegments) echo "kafka.tools.$n"; return 0 ;;
    ConfigCommand) echo "kafka.admin.ConfigCommand"; return 0 ;;
  esac
  # Unknown simple name: scan the jars once (index cached next to the libs).
  if [[ ! -s "$idx" || "$idx" -ot "$libs" ]]; then
    command -v unzip >/dev/null 2>&1 || die "unknown class '$n' and unzip is not installed: pass a fully-qualified class name"
    local j
    for j in "$libs"/kafka*.jar; do unzip -Z1 "$j" 2>/dev/null; done \
      | grep -E '\.class$' | grep -v '\$' | sed 's/\.class$//; s#/#.#g' >"$idx.tmp"
    mv "$idx.tmp" "$idx"
  fi
  hit="$(grep -E "^org\.apache\.kafka\.tools\.(.*\.)?$n\$" "$idx" | head -n1)"
  [[ -n "$hit" ]] || hit="$(grep -E "^kafka\.(.*\.)?$n\$" "$idx" | head -n1)"
  [[ -n "$hit" ]] || hit="$(grep -E "\.$n\$" "$idx" | head -n1)"
  [[ -n "$hit" ]] || die "no Kafka class named '$n' in $libs"
  echo "$hit"
}

cls="$(resolve "$name")"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"
# shellcheck disable=SC2086
exec "$JAVA" ${KAFKA_CLI_JVM_OPTS:--Xmx256m -XX:TieredStopAtLevel=1} -Xshare:auto \
  -Djava.awt.headless=true \
  -Dlog4j2.configurationFile="$INFRA_DIR/kafka/tools-log4j2.properties" \
  -cp "$libs/*" "$cls" "$@"
