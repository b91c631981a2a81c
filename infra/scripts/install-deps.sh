#!/usr/bin/env bash
# Usage: install-deps.sh [java] [maven] [postgres] [promtool] [openssl]   (no argument = all)
#
# Installs the system packages the local infra needs, via apt-get, but only
# when something is actually missing (a no-op costs a few ms). Debian/Ubuntu,
# must run as root when an install is needed. `apt-get update` is run only
# if the first install attempt fails (stale/missing package lists).
#
#   java     -> a Java >= 17 runtime   (openjdk-17-jre-headless)
#   maven    -> mvn                    (maven)
#   postgres -> initdb/pg_ctl/psql/... (postgresql, postgresql-client)
#   promtool -> promtool               (prometheus: its server is installed too but never
#               started: a policy-rc.d refuses service starts during the install, and the
#               unit it enables is stopped if an init system started it anyway)
#   openssl  -> libssl-dev, pkg-config, openssl (the Kafka clients' TLS and SCRAM, and the
#               secured local broker's certificates)
#
# Env: PG_BINDIR  directory holding initdb/pg_ctl (default: newest
#                 /usr/lib/postgresql/*/bin)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ "${1:-}" == -h || "${1:-}" == --help ]] && { print_help; exit 0; }
want=("$@")
[[ ${#want[@]} -gt 0 ]] || want=(java maven postgres promtool openssl)

java_ok() {
  command -v java >/dev/null 2>&1 || return 1
  local v
  v="$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java\.specification\.version = //p')"
  [[ "${v%%.*}" =~ ^[0-9]+$ ]] && (( ${v%%.*} >= 17 ))
}

pg_ok() {
  local d
  for d in ${PG_BINDIR:+"$PG_BINDIR"} /usr/lib/postgresql/*/bin; do
    [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/pg_isready" && -x "$d/postgres" ]] || continue
    command -v psql >/dev/null 2>&1 || [[ -x "$d/psql" ]] || continue
    id -u postgres >/dev/null 2>&1 || continue
    return 0
  done
  return 1
}

pkgs=()
for w in "${want[@]}"; do
  case "$w" in
    java) java_ok || pkgs+=(openjdk-17-jre-headless) ;;
    maven) command -v mvn >/dev/null 2>&1 || pkgs+=(maven) ;;
    postgres) pg_ok || pkgs+=(postgresql postgresql-client) ;;
    promtool) command -v promtool >/dev/null 2>&1 || pkgs+=(prometheus) ;;
    # The Kafka clients' TLS and SCRAM (librdkafka built against OpenSSL), and the openssl
    # command that makes the secured local broker's certificates.
    openssl)
      dpkg -s libssl-dev >/dev/null 2>&1 || pkgs+=(libssl-dev)
      command -v pkg-config >/dev/null 2>&1 || pkgs+=(pkg-config)
      command -v openssl >/dev/null 2>&1 || pkgs+=(openssl)
      ;;
    *) die "unknown component '$w' (expected: java maven postgres promtool openssl)" ;;
  esac
done

[[ ${#pkgs[@]} -eq 0 ]] && exit 0

[[ $(id -u) -eq 0 ]] || die "need root to apt-get install: ${pkgs[*]}"
command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install manually: ${pkgs[*]}"

mkdir -p "$STATE_DIR"
log="$STATE_DIR/install-deps.log"
export DEBIAN_FRONTEND=noninteractive
# Only promtool is wanted from the prometheus package: keep its server from starting (and from
# taking port 9090) while packages install, unless the machine already has a policy of its own.
policy=/usr/sbin/policy-rc.d
if [[ " ${pkgs[*]} " == *" prometheus "* && ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
if ! apt-get -y -q install --no-install-recommends "${pkgs[@]}" >"$log" 2>&1; then
  if ! { apt-get -q update && apt-get -y -q install --no-install-recommends "${pkgs[@]}"; } >>"$log" 2>&1; then
    die "apt-get install ${pkgs[*]} failed (see $log)"
  fi
fi
if [[ " ${pkgs[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
  systemctl disable --now prometheus.service >>"$log" 2>&1 || true
fi
