# shellcheck shell=bash
# Common helpers for infra/scripts/*.sh. Source it, do not run it.
#
# Honoured env:
#   CHAT_STATE_DIR  where runtime state lives (default: <repo>/.local)

INFRA_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
INFRA_DIR="$(dirname "$INFRA_SCRIPTS_DIR")"
REPO_ROOT="$(dirname "$INFRA_DIR")"
# shellcheck disable=SC2034  # used by the scripts that source this file
STATE_DIR="${CHAT_STATE_DIR:-$REPO_ROOT/.local}"
SCRIPT_NAME="$(basename "$0")"

die() {
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 1
}

# Print the last lines of a log file to stderr (used on failures).
tail_log() {
  local f="$1" n="${2:-40}"
  if [[ -f "$f" ]]; then
    echo "---- last $n lines of $f ----" >&2
    tail -n "$n" "$f" >&2 || true
    echo "----" >&2
  fi
}

# dsn_with_db DSN DB -> DSN (URL form) with its database replaced by DB and its parameters kept
# (sslmode, sslrootcert=/a/path...), as e2e's with_database does: the path is cut at the last
# slash before the '?', not in the query.
dsn_with_db() {
  local url="${1%%\?*}" query=""
  [[ "$1" == *\?* ]] && query="?${1#*\?}"
  echo "${url%/*}/$2$query"
}

# port_open HOST PORT -> 0 when something accepts TCP connections there.
port_open() {
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# pid_alive PID -> 0 when the process exists and is not a zombie.
pid_alive() {
  local pid="$1" state
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/stat" ]] || return 1
  state="$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null)" || return 1
  [[ "$state" != Z && "$state" != X ]]
}

# pid_cmdline_has PID STRING -> 0 when the process' argv contains STRING.
pid_cmdline_has() {
  local pid="$1" needle="$2"
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$needle"
}

# Run a command, capturing its output in a log; on failure die with one line.
run_logged() {
  local log="$1" what="$2"
  shift 2
  if ! "$@" >"$log" 2>&1; then
    die "$what failed (see $log)"
  fi
}

# Print the script's header comment (from line 2 to the first non-comment line).
print_help() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}
