#!/usr/bin/env bash
# Usage: bench/ab.sh [--rate R] [--seconds S] [--rounds N] [--warmup W]
#                    [--retention keep|delete-on-ack] [--statements] NAME=DIR[,VAR=value...] ...
#
# An A/B at one fixed rate, the way docs/performance-log.md compares changes: the variants run
# one after another, round after round (A B A B ...), on the Kafka and Postgres of `make stack`,
# and a Markdown report puts their figures side by side: per run, then per variant the median and
# its ratio to the first variant's (bench/ab_report.py).
#
# A variant is a name, a directory with the gateway, multiplexer and db-writer binaries to measure
# (this tree's target/release, or another commit's, built and copied aside: docs/operations.md,
# "Benchmarks", shows how), and optional settings: VAR=value goes to its gateways and its
# multiplexer, gateway:VAR=value to the gateways only, multiplexer:VAR=value to the multiplexer
# only, postgres:name=value sets a server setting of the stack's Postgres for the variant's runs
# (one a reload applies, such as commit_delay), and retention=keep|delete-on-ack runs the variant
# in that mode in place of --retention's.
# For example, this build against itself with a longer batch wait, or in both modes, alternated
# so that the machine's swings fall on both:
#
#   bench/ab.sh --rate 500 now=target/release wait5=target/release,MULTIPLEXER_BATCH_WAIT_MS=5
#   bench/ab.sh --rate 3000 keep=target/release doa=target/release,retention=delete-on-ack
#
# Each run is bench/bench.sh's e2e stage held at the rate (BENCH_STAGES=e2e): a warm-up at half
# the rate and a 5 s probe, then a confirm trial and a latency trial of S seconds each at the rate,
# and two short trials the search always ends with. The report reads the confirm and latency
# trials: delivered and receipt p50 / p99 as the load generator saw them, the hops' p50 / p99 from
# the pipeline's histograms, the delivered p99 second by second (the median second's, the
# slowest, the seconds over 1.5 times the median: a stall against a tail every second shares),
# CPU per message by process, the gateways' socket writes and the context switches by process per
# message, and the machine's busy cores (/proc/stat: the watched processes' share, the rest,
# interrupts, steal). The load generator and chatctl are
# this tree's in every run (bench.sh's BENCH_SERVICES_BIN), so the measuring side stays the same.
#
# A broker just started runs slower until its JIT has warmed up, so a run of the first variant
# with W-second trials goes first and is not reported (--warmup 0: none).
#
# --statements adds what each run cost Postgres statement by statement (pg_stat_statements,
# reset before each run and read after it, over all its trials): per message of the run, calls,
# time executing and planning, WAL, for the store, the user index write, the ack, the body keys'
# issue and read, and the rest. It needs the stack's Postgres started with the extension loaded:
#   infra/scripts/postgres.sh stop && PG_STAT_STATEMENTS=1 infra/scripts/postgres.sh start
# (a plain start afterwards unloads it).
#
# Defaults: --rate 500, --seconds 30, --rounds 2, --warmup 10, --retention keep; about 2 minutes a
# run at 30 s. Run-to-run noise on a shared 2-core machine is large: compare variants within one
# report, over at least two rounds. Output: target/bench/ab-<time>.md (also printed), and each
# run's outputs in target/bench/<run id>/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source infra/scripts/lib.sh

rate=500 seconds=30 rounds=2 warmup=10 retention=keep statements=0
variants=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rate) rate="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --retention) retention="$2"; shift 2 ;;
    --statements) statements=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) variants+=("$1"); shift ;;
  esac
done
[[ ${#variants[@]} -ge 1 ]] || die "no variant given (see --help)"
[[ "$rate" =~ ^[0-9]+$ && "$seconds" =~ ^[0-9]+$ && "$rounds" =~ ^[0-9]+$ && "$warmup" =~ ^[0-9]+$ ]] \
  || die "--rate, --seconds, --rounds and --warmup take whole numbers"
[[ "$retention" == keep || "$retention" == delete-on-ack ]] \
  || die "--retention: keep or delete-on-ack, not '$retention'"

names=() dirs=() envs=() gw_envs=() mx_envs=() pg_sets=() retentions=()
for v in "${variants[@]}"; do
  [[ "$v" == *=* ]] || die "variant '$v': NAME=DIR[,VAR=value...]"
  name="${v%%=*}" rest="${v#*=}"
  dir="${rest%%,*}" settings=""
  [[ "$rest" == *,* ]] && settings="${rest#*,}"
  [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || die "variant name '$name': letters, digits, . _ - only"
  for b in gateway multiplexer db-writer; do
    [[ -x "$dir/$b" ]] || die "variant $name: $dir/$b is missing (cargo build --release --bins)"
  done
  gw="" mx="" pg="" mode="$retention" env=""
  for setting in ${settings//,/ }; do
    case "$setting" in
      retention=keep|retention=delete-on-ack) mode="${setting#retention=}"; continue ;;
      retention=*) die "variant $name: retention=keep or retention=delete-on-ack, not '$setting'" ;;
      gateway:*=*) gw+=" ${setting#gateway:}" ;;
      multiplexer:*=*) mx+=" ${setting#multiplexer:}" ;;
      postgres:*=*)
        kv="${setting#postgres:}"
        [[ "${kv%%=*}" =~ ^[a-z_]+$ && "${kv#*=}" =~ ^[A-Za-z0-9_.]+$ ]] \
          || die "variant $name: '$setting' is not postgres:name=value (a server setting)"
        pg+=" $kv" ;;
      *=*) gw+=" $setting" mx+=" $setting" ;;
      *) die "variant $name: setting '$setting' is not [gateway:|multiplexer:]VAR=value" ;;
    esac
    env+=" $setting"
  done
  names+=("$name") dirs+=("$(cd "$dir" && pwd)") envs+=("${env# }") retentions+=("$mode")
  gw_envs+=("${gw# }") mx_envs+=("${mx# }") pg_sets+=("${pg# }")
done

# The statements' counters of the whole Postgres server, read through the first shard database
# of the stack (the runs' own databases are dropped when a run ends).
pg_admin="$(infra/scripts/postgres.sh url)"
if [[ "$statements" == 1 ]]; then
  loaded="$(psql -Atq "$pg_admin" -c "SHOW shared_preload_libraries" 2>/dev/null)" \
    || die "--statements: the stack's Postgres does not answer at $pg_admin (make stack)"
  [[ ",${loaded// /}," == *,pg_stat_statements,* ]] \
    || die "--statements: the stack's Postgres has not loaded pg_stat_statements; restart it with" \
      "'infra/scripts/postgres.sh stop && PG_STAT_STATEMENTS=1 infra/scripts/postgres.sh start'"
  psql -Atq "$pg_admin" -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" >/dev/null
fi

# postgres:name=value: the stack's server runs the variant with that setting (ALTER SYSTEM and a
# reload before its run, RESET and a reload after it, and on any exit). Only settings a reload
# applies: one that needs a restart stops the A/B.
pg_apply() { # "name=value ..."; waits until a new session sees each value
  local kv n v tries
  [[ -n "$1" ]] || return 0
  for kv in $1; do
    psql -Atq "$pg_admin" -c "ALTER SYSTEM SET ${kv%%=*} = '${kv#*=}'" >/dev/null \
      || die "postgres:$kv: ALTER SYSTEM failed"
  done
  psql -Atq "$pg_admin" -c "SELECT pg_reload_conf()" >/dev/null
  for kv in $1; do
    n="${kv%%=*}" v="${kv#*=}" tries=0
    until [[ "$(psql -Atq "$pg_admin" -c "SHOW $n")" == "$v" ]]; do
      [[ -z "$(psql -Atq "$pg_admin" -c "SELECT name FROM pg_settings WHERE pending_restart")" ]] \
        || die "postgres:$kv needs a restart of the server, not a reload"
      ((++tries < 50)) || die "postgres:$kv: the server shows $n = $(psql -Atq "$pg_admin" -c "SHOW $n")"
      sleep 0.1
    done
  done
}
# Every setting any variant makes goes back to the server's own (runs happen in subshells, so
# this does not track which one is set now).
pg_reset() {
  local kv all="${pg_sets[*]}"
  [[ -n "${all// /}" ]] || return 0
  for kv in $all; do psql -Atq "$pg_admin" -c "ALTER SYSTEM RESET ${kv%%=*}" >/dev/null || true; done
  psql -Atq "$pg_admin" -c "SELECT pg_reload_conf()" >/dev/null || true
  for kv in $all; do
    local tries=0
    until [[ "$(psql -Atq "$pg_admin" -c "SELECT count(*) FROM pg_settings
                 WHERE name = '${kv%%=*}' AND sourcefile LIKE '%postgresql.auto.conf'")" == 0 ]]; do
      ((++tries < 50)) || die "postgres:$kv: still set after RESET and a reload"
      sleep 0.1
    done
  done
}
trap pg_reset EXIT

WAL_NAMES="records|full_page_images|bytes|buffers_full|writes|syncs|write_ms|sync_ms"
WAL_COUNTERS="SELECT wal_records, wal_fpi, wal_bytes, wal_buffers_full, wal_write, wal_sync,
  round(wal_write_time::numeric, 3), round(wal_sync_time::numeric, 3) FROM pg_stat_wal"

out="target/bench/ab-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
runs="$out/runs.tsv"
: >"$runs"

# One run of variant $1 with $2-second trials (its outputs labelled $3); prints its run
# directory. bench.sh builds this tree's load generator and chatctl, the measuring side.
run_variant() {
  local i="$1" trial_seconds="$2" label="$3" log="$out/$3.log" run
  local search="--max-rate $rate --probe-seconds 5 --confirm-seconds $trial_seconds"
  search+=" --low-rate $rate --low-seconds $trial_seconds --latency-rate $rate"
  search+=" --latency-seconds 5 --budget-seconds 10"
  if [[ "$statements" == 1 ]]; then
    psql -Atq "$pg_admin" -c "SELECT pg_stat_statements_reset()" >/dev/null \
      || die "resetting pg_stat_statements failed"
  fi
  pg_apply "${pg_sets[$i]}"
  local wal_before
  wal_before="$(psql -Atq "$pg_admin" -c "$WAL_COUNTERS")" || die "reading pg_stat_wal failed"
  BENCH_STAGES=e2e BENCH_RETENTIONS="${retentions[$i]}" BENCH_START_RATE="$rate" \
    BENCH_SEARCH_ARGS="$search" BENCH_SERVICES_BIN="${dirs[$i]}" \
    BENCH_GATEWAY_ENV="${gw_envs[$i]}" BENCH_MULTIPLEXER_ENV="${mx_envs[$i]}" \
    BENCH_COMMAND="bench/ab.sh ($label)" \
    bench/bench.sh >"$log" 2>&1 || die "the run failed: see $log"
  pg_reset
  run="$(grep -o 'target/bench/bench[0-9]*' "$log" | tail -1)"
  [[ -n "$run" ]] || die "no run directory in $log"
  [[ "${retentions[$i]}" == keep ]] || run="$run/delete-on-ack"
  # What the run cost the server's WAL (over all its trials): counters of pg_stat_wal, the
  # difference across the run, a name and a number a line.
  paste <(tr '|' '\n' <<<"$WAL_NAMES") <(psql -Atq "$pg_admin" -c "$WAL_COUNTERS" | tr '|' '\n') \
    <(tr '|' '\n' <<<"$wal_before") \
    | awk -F'\t' '{ printf(($1 ~ /_ms$/) ? "%s\t%.3f\n" : "%s\t%.0f\n", $1, $2 - $3) }' \
    >"$run/postgres-wal.tsv" || die "reading pg_stat_wal failed"
  if [[ "$statements" == 1 ]]; then
    # One line a statement: calls, rows, ms executing, ms planning, WAL bytes, its text on one line.
    psql -Atq -F $'\t' "$pg_admin" -c "SELECT calls, rows, total_exec_time, total_plan_time,
        wal_bytes, regexp_replace(query, '\s+', ' ', 'g') FROM pg_stat_statements" \
      >"$run/statements.tsv" || die "reading pg_stat_statements failed"
  fi
  printf '%s\n' "$run"
}

if [[ "$warmup" -gt 0 ]]; then
  printf 'warm-up, %s: ' "${names[0]}" >&2
  run_variant 0 "$warmup" warmup >&2
fi
for round in $(seq 1 "$rounds"); do
  for i in "${!names[@]}"; do
    printf 'round %s, %s: ' "$round" "${names[$i]}" >&2
    run="$(run_variant "$i" "$seconds" "$round-${names[$i]}")"
    printf '%s\n' "$run" >&2
    printf '%s\t%s\t%s\n' "$round" "${names[$i]}" "$run" >>"$runs"
  done
done

{
  modes="$(printf '%s\n' "${retentions[@]}" | sort -u)"
  if [[ "$modes" == *$'\n'* ]]; then
    modes="each variant in its mode"
  else
    modes="$modes mode"
  fi
  echo "# A/B at $rate msg/s ($modes; ${seconds} s trials, $rounds rounds)"
  echo
  for i in "${!names[@]}"; do
    echo "- ${names[$i]}: ${dirs[$i]}, ${retentions[$i]} mode${envs[$i]:+, with ${envs[$i]}}"
  done
  echo
  python3 bench/ab_report.py "$rate" "$runs"
} | tee "$out.md"
echo "report: $out.md" >&2
