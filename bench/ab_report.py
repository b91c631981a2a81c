#!/usr/bin/env python3
"""The report of bench/ab.sh: usage `ab_report.py RATE RUNS_TSV`.

RUNS_TSV lists the runs in the order they ran: round, variant, run directory (each holding the
search.json of bench/bench.sh's e2e stage). Prints Markdown: per run, the confirm and the latency
trial at RATE (latency as the load generator saw it, the hops' p50 / p99 from the pipeline's own
histograms, CPU per message by process); then per variant the median over its trials (one slow
run, such as the first after a broker restart, moves it less than a mean), and each figure as a
ratio to the first variant's median. A line first says in how many of each variant's runs
a confirm trial held RATE; a run whose probe failed at RATE has no confirm there, and its probe
stands in for it in the tables. Last, each variant's median of the gateways' socket writes (one
flush each) per message delivered, and its ratio to the first variant's; then, when the trials
counted them, its median of the context switches per message delivered by process (a thread
that blocked or was preempted: what the pipeline's wake-ups cost, counted), and the ratio of
their sum to the first variant's; then, when the trials read them, its median of the machine's
cores (/proc/stat): busy, the watched processes' share, the rest, interrupts and steal.

With --statements, each run directory also holds statements.tsv (pg_stat_statements over the
whole run, one line a statement: calls, rows, ms executing, ms planning, WAL bytes, text). The
report then adds what Postgres's statements cost per message of the run (every message its
trials sent), grouped by what they do, as each variant's median over its runs.

Each run directory may also hold postgres-wal.tsv (bench/ab.sh writes it: what the whole run cost
the server's WAL, pg_stat_wal's counters across it, a name and a number a line). The report then
adds, per variant, the median over its runs of the WAL per message of the run and of its
flushes: how many, and how long one took (wal_sync_time, which the server counts only with
track_wal_io_timing on; without it that column stays empty).
"""

import json
import re
import sys
from pathlib import Path

TRIALS = ("confirm", "latency-low")
PROCESSES = ("gateway", "kafka", "loadgen", "multiplexer", "postgres")
HOPS = (
    ("produce", "gateway_produce_seconds"),
    ("inbound wait", "multiplexer_inbound_wait_seconds"),
    ("batch wait", "multiplexer_batch_wait_seconds"),
    ("store", "multiplexer_store_seconds"),
    ("index", "multiplexer_index_seconds"),
    ("catch-up", "multiplexer_presence_catch_up_seconds"),
    ("route", "multiplexer_route_seconds"),
    ("outbound wait", "gateway_outbound_wait_seconds"),
    ("outbound open", "gateway_outbound_open_seconds"),
)


# What a statement does, by its text (the first pattern that matches): the writers' statements
# (db-writer), then the bench's own setup (its databases, and the migrations, which begin with
# their comments), then the rest.
STATEMENT_GROUPS = (
    ("store", r"^WITH taken AS"),
    ("store, second attempt", r"INSERT INTO conversations AS c \(conversation\) |JOIN messages m "
                              r"ON md5|^INSERT INTO messages |^INSERT INTO acks |"
                              r"^UPDATE conversations c SET last_seq"),
    ("user index", r"INSERT INTO user_conversations"),
    ("ack", r"^WITH a AS"),
    ("body key issue", r"^INSERT INTO (body_keys|sealing_keys)"),
    ("body key read", r"JOIN body_keys k ON|^SELECT id, key FROM sealing_keys"),
    ("skipped copies' keys", r"^DELETE FROM sealing_keys WHERE id = ANY"),
    ("plan mode", r"^(SET|RESET) plan_cache_mode"),
    ("transaction control", r"^(BEGIN|COMMIT|ROLLBACK)\b"),
    ("bench setup", r"^(--|DO |CREATE|DROP|ALTER|GRANT|REVOKE|COMMENT|"
                    r"SELECT pg_stat_statements_reset)"),
)
STATEMENT_COLUMNS = ("calls a message", "rows a call", "executing µs", "planning µs", "WAL bytes")
STATEMENT_DIGITS = {"calls a message": 2, "rows a call": 1, "executing µs": 1, "planning µs": 1,
                    "WAL bytes": 0}


def statement_group(text):
    for name, pattern in STATEMENT_GROUPS:
        if re.search(pattern, text):
            return name
    return "other"


def statements(path, messages):
    """Per group of statements, its cost per message of the run; None without the file."""
    if not path.exists():
        return None
    totals = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        calls, rows, executing, planning, wal, text = line.split("\t", 5)
        t = totals.setdefault(statement_group(text), [0, 0, 0.0, 0.0, 0])
        t[0] += int(calls)
        t[1] += int(rows)
        t[2] += float(executing)
        t[3] += float(planning)
        t[4] += int(float(wal or 0))
    if not messages:
        return {}
    return {group: {"calls a message": calls / messages,
                    "rows a call": rows / calls if calls else None,
                    "executing µs": executing * 1000.0 / messages,
                    "planning µs": planning * 1000.0 / messages,
                    "WAL bytes": wal / messages}
            for group, (calls, rows, executing, planning, wal) in totals.items()}


def figures(trial):
    """A trial's figures, by column name (None where the trial has none)."""
    f = {}
    for what, key in (("delivered", "deliver_latency"), ("receipt", "receipt_latency")):
        latency = trial.get(key) or {}
        f[f"{what} p50"] = latency.get("p50_ms")
        f[f"{what} p99"] = latency.get("p99_ms")
    histograms = (trial.get("pipeline") or {}).get("histograms") or {}
    for name, metric in HOPS:
        h = histograms.get(metric) or {}
        for q in ("p50", "p99"):
            v = h.get(q)
            f[f"{name} {q}"] = None if v is None else v * 1000.0
    delivered = trial.get("delivered") or 0
    cpu = trial.get("cpu") or {}
    for p in PROCESSES:
        s = (cpu.get("seconds") or {}).get(p)
        f[p] = s / delivered * 1e6 if s is not None and delivered else None
    total = cpu.get("total_seconds")
    f["all"] = total / delivered * 1e6 if total is not None and delivered else None
    writes = (histograms.get("gateway_socket_write_seconds") or {}).get("count")
    f["socket writes"] = writes / delivered if writes is not None and delivered else None
    switches = cpu.get("switches") or {}
    for p in PROCESSES:
        n = switches.get(p)
        f[f"switches {p}"] = n / delivered if n is not None and delivered else None
    f["switches all"] = (sum(switches.get(p, 0) for p in PROCESSES) / delivered
                         if switches and delivered else None)
    machine, wall = cpu.get("machine"), cpu.get("wall_seconds")
    if machine and wall:
        busy = sum(machine.get(k, 0.0) for k in ("user", "system", "irq", "steal"))
        f["cores busy"] = busy / wall
        f["cores watched"] = (total or 0.0) / wall
        f["cores unwatched"] = (busy - (total or 0.0)) / wall
        f["cores irq"] = machine.get("irq", 0.0) / wall
        f["cores steal"] = machine.get("steal", 0.0) / wall
    seconds = [x.get("p99_ms") for x in trial.get("delivered_by_second") or []]
    seconds = [v for v in seconds if v is not None]
    if seconds:
        f["seconds"] = len(seconds)
        f["seconds p99 median"] = median(seconds)
        f["seconds p99 slowest"] = max(seconds)
        f["seconds over 1.5x"] = sum(1 for v in seconds if v > 1.5 * f["seconds p99 median"])
    return f


MACHINE = ("busy", "watched", "unwatched", "irq", "steal")


def machine_table(order, rows):
    """Each variant's median over its trials of the machine's cores (from /proc/stat): busy on
    average, the watched processes' share, the rest (busy less watched: what no CPU row counts),
    and of the busy ones those in interrupts and softirqs and those stolen by the hypervisor;
    None when no trial read them (a load generator from before they were)."""
    if all(f.get("cores busy") is None for _, f, _ in rows):
        return None
    out = ["The machine's cores through each trial (from /proc/stat; busy on average, those the "
           "watched processes were charged, the rest, and of the busy ones those in interrupts and "
           "softirqs and those the hypervisor gave to other guests; each variant's median over its "
           "trials; the processes' ticks and the machine's are read a moment apart, so the rest "
           "can read a hundredth or so below 0)", ""]
    out.append("| variant | trials | " + " | ".join(MACHINE) + " |")
    out.append("|---|" + "---:|" * (len(MACHINE) + 1))
    for v in order:
        mine = [f for _, f, w in rows if w == v]
        m = {c: median([f.get(f"cores {c}") for f in mine]) for c in MACHINE}
        trials = sum(1 for f in mine if f.get("cores busy") is not None)
        out.append(f"| {v} | {trials} | " + " | ".join(cell(m[c], 2) for c in MACHINE) + " |")
    return "\n".join(out) + "\n"


def seconds_table(order, rows):
    """Each trial's delivered p99 second by second (the messages scheduled in each second):
    the median second's, the slowest, and how many seconds were over 1.5 times the median; then
    each variant's median of those. A p99 that one stall set shows as a slow second over a median
    near the rest; one every second shares, as a median near the trial's p99. None when no trial
    has them (a load generator from before they were)."""
    if all(f.get("seconds") is None for _, f, _ in rows):
        return None
    out = ["Delivered p99 second by second (of the messages scheduled in each second of a trial: "
           "the median second's, the slowest second's, and the seconds over 1.5 times the median; "
           "then each variant's median over its trials)", ""]
    out.append("| round | variant | trial | delivered p99 | seconds | median second | slowest "
               "second | seconds over 1.5x |")
    out.append("|---|---|---|---:|---:|---:|---:|---:|")
    for labels, f, _ in rows:
        if f.get("seconds") is None:
            continue
        out.append("| " + " | ".join(labels) + " | " + " | ".join(
            [cell(f.get("delivered p99"), 1), str(f["seconds"]),
             cell(f["seconds p99 median"], 1), cell(f["seconds p99 slowest"], 1),
             str(f["seconds over 1.5x"])]) + " |")
    for v in order:
        mine = [f for _, f, w in rows if w == v and f.get("seconds") is not None]
        if not mine:
            continue
        out.append(f"| median of {len(mine)} | {v} | | "
                   + " | ".join([cell(median([f.get("delivered p99") for f in mine]), 1), "",
                                 cell(median([f["seconds p99 median"] for f in mine]), 1),
                                 cell(median([f["seconds p99 slowest"] for f in mine]), 1),
                                 cell(median([f["seconds over 1.5x"] for f in mine]), 1)])
                   + " |")
    return "\n".join(out) + "\n"


def switches_table(order, rows):
    """Each variant's median over its trials of the context switches per message delivered, by
    process and over all of them, and the ratio of all to the first variant's; None when no
    trial has them (a load generator from before they were counted)."""
    if all(f.get("switches all") is None for _, f, _ in rows):
        return None
    out = ["Context switches per message delivered, by process (a thread that blocked or was "
           "preempted, from /proc; each variant's median over its trials)", ""]
    out.append("| variant | trials | " + " | ".join(PROCESSES) + " | all | ratio |")
    out.append("|---|" + "---:|" * (len(PROCESSES) + 3))
    base = None
    for v in order:
        mine = [f for _, f, w in rows if w == v]
        m = {c: median([f.get(f"switches {c}") for f in mine]) for c in PROCESSES + ("all",)}
        base = m["all"] if base is None else base
        ratio = m["all"] / base if m["all"] is not None and base else None
        trials = sum(1 for f in mine if f.get("switches all") is not None)
        cells = [cell(m[c], 2) for c in PROCESSES + ("all",)]
        out.append(f"| {v} | {trials} | " + " | ".join(cells) + f" | {cell(ratio, 2)} |")
    return "\n".join(out) + "\n"


def writes_table(order, rows):
    """Each variant's median over its trials of the gateways' socket writes (each one flush of
    the frames a connection took at once) per message delivered; None when no trial has them."""
    if all(f.get("socket writes") is None for _, f, _ in rows):
        return None
    out = ["The gateways' socket writes (one flush each) per message delivered "
           "(gateway_socket_write_seconds' count; each variant's median over its trials)", ""]
    out.append("| variant | trials | writes a message | ratio |")
    out.append("|---|---:|---:|---:|")
    base = None
    for v in order:
        values = [f.get("socket writes") for _, f, w in rows if w == v]
        m = median(values)
        base = m if base is None else base
        ratio = m / base if m is not None and base else None
        trials = sum(1 for x in values if x is not None)
        out.append(f"| {v} | {trials} | {cell(m, 2)} | {cell(ratio, 2)} |")
    return "\n".join(out) + "\n"


LATENCY = ["delivered p50", "delivered p99", "receipt p50", "receipt p99"] + [
    f"{name} {q}" for name, _ in HOPS for q in ("p50", "p99")
]
CPU = list(PROCESSES) + ["all"]


def cell(v, digits):
    return "" if v is None else f"{v:,.{digits}f}"


def table(title, columns, rows, digits):
    """rows: (label cells, {column: value}[, digits of that row])."""
    out = [f"{title}", ""]
    head = ["round", "variant", "trial"]
    out.append("| " + " | ".join(head + columns) + " |")
    out.append("|" + "---|" * len(head) + "---:|" * len(columns))
    for labels, f, *row_digits in rows:
        d = row_digits[0] if row_digits else digits
        out.append("| " + " | ".join(labels + [cell(f.get(c), d) for c in columns]) + " |")
    return "\n".join(out) + "\n"


WAL_COLUMNS = ("WAL bytes a message", "WAL records a message", "full-page images per 1,000",
               "flushes per 1,000", "ms a flush", "flush ms per 1,000")
WAL_DIGITS = (0, 1, 1, 1, 2, 1)


def wal(path, messages):
    """The run's WAL figures per message (WAL_COLUMNS); None without the file or messages."""
    if not path.exists() or not messages:
        return None
    c = {}
    for line in path.read_text().splitlines():
        name, value = line.split("\t")
        c[name] = float(value)
    per_k = 1000 / messages
    timed = c.get("sync_ms", 0) > 0
    return dict(zip(WAL_COLUMNS, (
        c["bytes"] / messages, c["records"] / messages, c["full_page_images"] * per_k,
        c["syncs"] * per_k, c["sync_ms"] / c["syncs"] if timed and c["syncs"] else None,
        c["sync_ms"] * per_k if timed else None)))


def wal_table(order, wal_runs):
    """Each variant's median over its runs."""
    out = ["Postgres's WAL per message of the run (pg_stat_wal over the whole run; each "
           "variant's median over its runs)", ""]
    out.append("| variant | " + " | ".join(WAL_COLUMNS) + " |")
    out.append("|---|" + "---:|" * len(WAL_COLUMNS))
    for v in order:
        runs = [w for name, w in wal_runs if name == v]
        if runs:
            label = f"{v} ({len(runs)} run{'' if len(runs) == 1 else 's'})"
            out.append(f"| {label} | " + " | ".join(
                cell(median([r[c] for r in runs]), d) for c, d in zip(WAL_COLUMNS, WAL_DIGITS))
                + " |")
    return "\n".join(out) + "\n"


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def main():
    rate, runs_tsv = float(sys.argv[1]), Path(sys.argv[2])
    rows, missing, statement_runs, wal_runs = [], [], [], []
    held = {}  # variant: for each of its runs, whether a confirm trial held RATE
    order = []
    for line in runs_tsv.read_text().splitlines():
        round_, variant, run = line.split("\t")
        if variant not in order:
            order.append(variant)
        report = json.loads((Path(run) / "search.json").read_text())
        sent = sum(t.get("sent") or 0 for t in report.get("trials", []))
        costs = statements(Path(run) / "statements.tsv", sent)
        if costs is not None:
            statement_runs.append((variant, costs))
        written = wal(Path(run) / "postgres-wal.tsv", sent)
        if written is not None:
            wal_runs.append((variant, written))
        found, confirmed = set(), False
        for t in report.get("trials", []):
            spec = t.get("spec", {})
            if spec.get("label") in TRIALS and round(spec.get("rate", 0)) == round(rate):
                verdict = "" if t.get("passed") else " (failed)"
                confirmed |= spec["label"] == "confirm" and bool(t.get("passed"))
                rows.append(([round_, variant, spec["label"] + verdict], figures(t), variant))
                found.add(spec["label"])
        if "confirm" not in found:
            # The probe failed at the rate, so the search never confirmed there: the probe is
            # what the run has to show of the rate.
            probes = [t for t in report.get("trials", [])
                      if t.get("spec", {}).get("label") == "probe"
                      and round(t["spec"].get("rate", 0)) == round(rate)]
            for t in probes[-1:]:
                verdict = "" if t.get("passed") else " (failed)"
                rows.append(([round_, variant, "probe" + verdict], figures(t), variant))
        held.setdefault(variant, []).append(confirmed)
        missing += [f"round {round_}, {variant}: no {label} trial at {rate:g} msg/s (see {run})"
                    for label in TRIALS if label not in found]

    print(held_line(rate, order, held))
    print()
    per_run = [(labels, f) for labels, f, _ in rows]
    print(table("Latency (ms): the load generator's, then each hop's", LATENCY, per_run, 1))
    print(table("CPU per message (µs), by process", CPU, per_run, 0))

    medians = {v: {c: median([f.get(c) for _, f, w in rows if w == v]) for c in LATENCY + CPU}
               for v in order}
    base = medians[order[0]] if order else {}
    summary = []
    for v in order:
        trials = sum(1 for *_, w in rows if w == v)
        summary.append(([f"median of {trials}", v, ""], medians[v], 1))
    for v in order[1:]:
        ratio = {c: (medians[v][c] / base[c] if medians[v][c] is not None and base.get(c) else None)
                 for c in LATENCY + CPU}
        summary.append((["ratio", f"{v} / {order[0]}", ""], ratio, 2))
    print(table("Per variant (medians over its trials; ratios to the first variant's)", LATENCY,
                summary, 1))
    print(table("", CPU, summary, 1).lstrip("\n"))
    by_second = seconds_table(order, rows)
    if by_second:
        print(by_second)
    writes = writes_table(order, rows)
    if writes:
        print(writes)
    switched = switches_table(order, rows)
    if switched:
        print(switched)
    machine = machine_table(order, rows)
    if machine:
        print(machine)
    if statement_runs:
        print(statement_table(order, statement_runs))
    if wal_runs:
        print(wal_table(order, wal_runs))
    for m in missing:
        print(f"- {m}")


def held_line(rate, order, held):
    """In how many of each variant's runs a confirm trial held RATE (every message delivered and
    receipted, within the load generator's bounds). A run whose probe already failed at RATE
    has no confirm there: it did not hold it."""
    parts = [f"{v} {sum(held.get(v, []))} of {len(held.get(v, []))}" for v in order]
    return f"Runs whose confirm trial held {rate:g} msg/s: " + ", ".join(parts) + "."


def statement_table(order, statement_runs):
    """Each variant's median over its runs, per group of statements, then the sums."""
    names = [n for n, _ in STATEMENT_GROUPS] + ["other"]
    present = [n for n in names if any(n in costs for _, costs in statement_runs)]
    out = ["Postgres's statements per message of the run (pg_stat_statements; each variant's "
           "median over its runs)", ""]
    out.append("| variant | statements | " + " | ".join(STATEMENT_COLUMNS) + " |")
    out.append("|---|---|" + "---:|" * len(STATEMENT_COLUMNS))
    for v in order:
        runs = [costs for w, costs in statement_runs if w == v]
        if not runs:
            continue
        label = f"{v} ({len(runs)} run{'' if len(runs) == 1 else 's'})"
        sums = {"executing µs": 0.0, "planning µs": 0.0, "calls a message": 0.0, "WAL bytes": 0.0}
        for group in present:
            # A run without the group did not run it: it counts as 0, not as missing.
            per_run = {c: median([(r.get(group) or {}).get(c, 0.0 if c != "rows a call" else None)
                                  for r in runs]) for c in STATEMENT_COLUMNS}
            if group != "bench setup":
                for c in sums:
                    sums[c] += per_run[c] or 0.0
            out.append(f"| {label} | {group} | " + " | ".join(
                cell(per_run[c], STATEMENT_DIGITS[c]) for c in STATEMENT_COLUMNS) + " |")
        # Rows a call do not add up across statements: that cell stays empty.
        out.append(f"| {label} | all but the bench's setup | " + " | ".join(
            cell(sums.get(c), STATEMENT_DIGITS[c]) for c in STATEMENT_COLUMNS) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
