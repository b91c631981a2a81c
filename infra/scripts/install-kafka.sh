#!/usr/bin/env bash
# Usage: install-kafka.sh [--force]
#
# Materialises the Kafka broker + tools pinned by infra/kafka/pom.xml into
# <state>/kafka-dist/libs (state = .local by default) with
#   mvn -q -B dependency:copy-dependencies
# Skipped when libs/ already holds the jars for the same pom (sha256 stamp).
# Installs java/maven via install-deps.sh first if they are missing.
#
# Env:
#   KAFKA_HOME      if set and $KAFKA_HOME/libs exists, nothing is installed:
#                   the scripts use those jars instead.
#   CHAT_STATE_DIR  state dir (default <repo>/.local)
#   MAVEN_ARGS_EXTRA extra args for mvn (e.g. -o, -s settings.xml)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

force=0
for a in "$@"; do
  case "$a" in
    --force) force=1 ;;
    -h|--help) print_help; exit 0 ;;
    *) die "unknown argument '$a'" ;;
  esac
done

if [[ -n "${KAFKA_HOME:-}" && -d "${KAFKA_HOME}/libs" ]]; then
  "$INFRA_SCRIPTS_DIR/install-deps.sh" java
  exit 0
fi

pom="$INFRA_DIR/kafka/pom.xml"
dist="$STATE_DIR/kafka-dist"
libs="$dist/libs"
stamp="$dist/pom.sha256"
[[ -f "$pom" ]] || die "missing $pom"
want="$(sha256sum "$pom" | cut -d' ' -f1)"

if [[ $force -eq 0 && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
   && compgen -G "$libs/kafka_2.13-*.jar" >/dev/null; then
  exit 0
fi

"$INFRA_SCRIPTS_DIR/install-deps.sh" java maven

mkdir -p "$dist"
exec 9>"$dist/.install.lock"
flock 9
# Re-check: another process may have finished the same install meanwhile.
if [[ $force -eq 0 && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
   && compgen -G "$libs/kafka_2.13-*.jar" >/dev/null; then
  exit 0
fi

tmp="$dist/libs.tmp.$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
log="$dist/mvn.log"
# shellcheck disable=SC2086
if ! (cd "$dist" && mvn -q -B ${MAVEN_ARGS_EXTRA:-} -f "$pom" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp") >"$log" 2>&1; then
  die "mvn dependency:copy-dependencies failed for $pom (see $log)"
fi
compgen -G "$tmp/kafka_2.13-*.jar" >/dev/null || die "mvn produced no kafka_2.13 jar (see $log)"

rm -rf "$libs.old"
[[ -d "$libs" ]] && mv "$libs" "$libs.old"
mv "$tmp" "$libs"
rm -rf "$libs.old" "$dist/classes.idx"
echo "$want" >"$stamp"
