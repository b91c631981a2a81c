"""bench/ab_report.py, the report of bench/ab.sh, on runs made up here (make test-infra runs it).

- Only the confirm and latency trials at the A/B's rate count: a probe, a trial at another rate
  (the search stepping down) and the short trials the search ends with are left out, and a run
  without its trials is named at the end.
- Per variant, the median over its trials (not the mean: one slow run moves it less), and each
  figure's ratio to the first variant's median; CPU per message is seconds over messages
  delivered; a failed trial says so, and a line counts each variant's runs whose confirm held
  the rate (a run whose probe failed there has none).
- With statements.tsv in the runs (--statements): Postgres's statements grouped by what they do,
  per message of the whole run (every trial's sends), each variant's median over its runs; a
  group a run did not run counts as 0 there; the bench's own setup is shown but not summed.
- With postgres-wal.tsv in the runs: the WAL per message of the whole run and its flushes, each
  variant's median over its runs; a flush's time stays empty when the server did not time it.
- Context switches per message delivered by process, when the trials counted them: each
  variant's median, and the ratio of their sum to the first variant's; no table without them.
- The machine's cores (busy, watched, the rest, interrupts, steal), when the trials read them:
  each variant's median; no table without them.
- The delivered p99 second by second, when the trials have it: each trial's median second, its
  slowest, and its seconds over 1.5 times the median, then each variant's medians; no table
  without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parent / "ab_report.py"


def trial(label, rate, delivered_p50, postgres_seconds, passed=True, delivered=1000):
    return {
        "spec": {"label": label, "rate": rate},
        "passed": passed,
        "sent": delivered,
        "delivered": delivered,
        "deliver_latency": {"p50_ms": delivered_p50, "p99_ms": delivered_p50 * 3},
        "receipt_latency": {"p50_ms": delivered_p50 * 2, "p99_ms": delivered_p50 * 6},
        "cpu": {
            "seconds": {"gateway": 0.4, "kafka": 0.8, "loadgen": 0.2, "multiplexer": 0.5,
                        "postgres": postgres_seconds},
            "total_seconds": 1.9 + postgres_seconds,
            # Context switches: the gateway's follow the Postgres seconds (10,000 a second).
            "switches": {"gateway": round(postgres_seconds * 10_000), "kafka": 3000,
                         "loadgen": 2000, "multiplexer": 1000, "postgres": 4000},
            # The machine over 5 s: the watched processes' time and 3.6 s more, 0.5 of it in
            # interrupts and 0.1 stolen.
            "wall_seconds": 5.0,
            "machine": {"user": 1.9 + postgres_seconds + 1.0, "system": 2.0, "irq": 0.5,
                        "steal": 0.1, "idle": 5.0},
        },
        "pipeline": {"histograms": {
            "multiplexer_store_seconds": {"p50": 0.002, "p99": None},
            "gateway_socket_write_seconds": {"count": round(delivered * postgres_seconds * 4)},
        }},
    }


def write_run(root: Path, name: str, trials) -> Path:
    run = root / name
    run.mkdir()
    (run / "search.json").write_text(json.dumps({"trials": trials}))
    return run


def report(tmp_path: Path, rate: int, runs) -> str:
    tsv = tmp_path / "runs.tsv"
    tsv.write_text("".join(f"{r}\t{v}\t{d}\n" for r, v, d in runs))
    out = subprocess.run([sys.executable, str(REPORT), str(rate), str(tsv)],
                         check=True, capture_output=True, text=True)
    return out.stdout


def rows(text: str, first: str):
    """The cells of the table rows whose first cell begins with `first`, in order."""
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines()
            if line.startswith("|") and line.strip("|").split("|")[0].strip().startswith(first)]


def test_medians_and_ratios_of_the_trials_at_the_rate(tmp_path):
    a1 = write_run(tmp_path, "a1", [
        trial("warmup", 250, 99.0, 9.0),
        trial("probe", 500, 99.0, 9.0),
        trial("confirm", 500, 10.0, 1.0),
        trial("latency-low", 500, 12.0, 1.2),
        trial("latency-at-80pct", 400, 99.0, 9.0),
    ])
    b1 = write_run(tmp_path, "b1", [
        trial("confirm", 500, 8.0, 0.8), trial("latency-low", 500, 9.0, 0.9)])
    a2 = write_run(tmp_path, "a2", [
        # A slow run: the median of a's four trials is the mean of the middle two, 11 and 12.
        trial("confirm", 500, 50.0, 5.0), trial("latency-low", 500, 11.0, 1.1)])
    b2 = write_run(tmp_path, "b2", [
        # The confirm at the rate failed and the search stepped down: only the failed one counts.
        trial("confirm", 500, 7.0, 0.7, passed=False), trial("confirm", 425, 1.0, 0.1)])
    text = report(tmp_path, 500, [("1", "a", a1), ("1", "b", b1), ("2", "a", a2), ("2", "b", b2)])

    # b's second confirm failed at the rate (its confirm at 425 msg/s is not counted).
    assert "Runs whose confirm trial held 500 msg/s: a 2 of 2, b 1 of 2." in text
    per_run = rows(text, "1") + rows(text, "2")
    latency_rows = [r for r in per_run if len(r) > 12]
    assert [r[:3] for r in latency_rows] == [
        ["1", "a", "confirm"], ["1", "a", "latency-low"], ["1", "b", "confirm"],
        ["1", "b", "latency-low"], ["2", "a", "confirm"], ["2", "a", "latency-low"],
        ["2", "b", "confirm (failed)"]]
    assert latency_rows[0][3:7] == ["10.0", "30.0", "20.0", "60.0"]

    medians = rows(text, "median of")
    latency, cpu = medians[:2], medians[2:]
    assert latency[0][:4] == ["median of 4", "a", "", "11.5"]  # (11 + 12) / 2
    assert latency[1][:4] == ["median of 3", "b", "", "8.0"]  # 7, 8, 9
    # Postgres: 1,150 µs a message for a ((1.1 + 1.2) / 2 s over 1,000), 800 for b.
    assert cpu[0][7] == "1,150.0" and cpu[1][7] == "800.0"
    ratio_latency, ratio_cpu = rows(text, "ratio")
    assert ratio_latency[1] == "b / a" and ratio_latency[3] == "0.70"  # 8.0 / 11.5
    assert ratio_cpu[7] == "0.70"  # 800 / 1,150
    # A histogram without a p99 leaves its cell empty.
    store_p99 = ["store p50", "store p99"]
    header = next(line for line in text.splitlines() if line.startswith("| round"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    at = columns.index(store_p99[1])
    assert latency_rows[0][columns.index(store_p99[0])] == "2.0" and latency_rows[0][at] == ""
    # Socket writes a message delivered (4 × the Postgres seconds above): a's median over its
    # four trials is 4.6 ((4.4 + 4.8) / 2), b's over its three 3.2 (2.8, 3.2, 3.6).
    lines = text.splitlines()
    head = lines.index("| variant | trials | writes a message | ratio |")
    writes = [[c.strip() for c in line.strip("|").split("|")] for line in lines[head + 2:head + 4]]
    assert writes == [["a", "4", "4.60", "1.00"], ["b", "3", "3.20", "0.70"]]
    # Context switches a message delivered: the gateway's 10 × the Postgres seconds (a: 11.5, b:
    # 8.0), the others' the same in every trial (3, 2, 1 and 4 over 1,000 messages); all is
    # their sum, and its ratio b's over a's (18.0 / 21.5).
    head = lines.index("| variant | trials | gateway | kafka | loadgen | multiplexer | postgres "
                       "| all | ratio |")
    switched = [[c.strip() for c in line.strip("|").split("|")]
                for line in lines[head + 2:head + 4]]
    assert switched == [["a", "4", "11.50", "3.00", "2.00", "1.00", "4.00", "21.50", "1.00"],
                        ["b", "3", "8.00", "3.00", "2.00", "1.00", "4.00", "18.00", "0.84"]]
    # The machine's cores over each trial's 5 s: watched = (1.9 + the Postgres seconds) / 5 (a's
    # median 3.05 / 5, b's 2.7 / 5), busy 3.6 / 5 more, all of that unwatched.
    head = lines.index("| variant | trials | busy | watched | unwatched | irq | steal |")
    machine = [[c.strip() for c in line.strip("|").split("|")]
               for line in lines[head + 2:head + 4]]
    assert machine == [["a", "4", "1.33", "0.61", "0.72", "0.10", "0.02"],
                       ["b", "3", "1.26", "0.54", "0.72", "0.10", "0.02"]]


def test_a_run_without_its_trials_is_named(tmp_path):
    a1 = write_run(tmp_path, "a1", [trial("confirm", 500, 10.0, 1.0)])
    # The probe failed at the rate, so the search never confirmed there: the run did not hold it.
    a2 = write_run(tmp_path, "a2", [trial("probe", 500, 10.0, 1.0, passed=False)])
    text = report(tmp_path, 500, [("1", "a", a1), ("2", "a", a2)])
    assert f"- round 1, a: no latency-low trial at 500 msg/s (see {a1})" in text
    assert f"- round 2, a: no confirm trial at 500 msg/s (see {a2})" in text
    assert "Runs whose confirm trial held 500 msg/s: a 1 of 2." in text
    # Its failed probe stands in for the confirm in the tables.
    assert [r[:3] for r in rows(text, "2")][:1] == [["2", "a", "probe (failed)"]]


STORE = "WITH taken AS ( INSERT INTO conversations AS c (conversation, last_seq) SELECT 1"
INDEX = "INSERT INTO user_conversations AS u (user_id, conversation) SELECT 1"
KEY_ISSUE = "INSERT INTO body_keys AS k (conversation, sender) SELECT 1"
SETUP = 'CREATE DATABASE "bench1_s0"'
MIGRATION = "-- Per-conversation sequence counters. CREATE TABLE conversations (conversation text)"


def write_statements(run: Path, lines):
    """lines: (calls, rows, ms executing, ms planning, WAL bytes, text)."""
    (run / "statements.tsv").write_text(
        "".join("\t".join(str(x) for x in line) + "\n" for line in lines))


def test_statements_per_message_of_the_run(tmp_path):
    # 1,000 messages in a1 (two trials of 500 sent), 2,000 in a2 and in b1.
    a1 = write_run(tmp_path, "a1", [trial("confirm", 500, 10.0, 1.0, delivered=500),
                                    trial("latency-low", 500, 10.0, 1.0, delivered=500)])
    write_statements(a1, [(100, 1000, 50.0, 20.0, 1000000, STORE),
                          (40, 4000, 30.0, 5.0, 600000, INDEX),
                          (1, 0, 600.0, 0.0, 0, SETUP),
                          (1, 0, 300.0, 0.0, 0, MIGRATION)])
    a2 = write_run(tmp_path, "a2", [trial("confirm", 500, 10.0, 1.0, delivered=2000)])
    # Two lines of one group (two shards) add up; a2 issued body keys, a1 did not.
    write_statements(a2, [(150, 1000, 60.0, 20.0, 1000000, STORE),
                          (150, 1000, 60.0, 20.0, 1000000, STORE),
                          (80, 8000, 50.0, 10.0, 1200000, INDEX),
                          (1000, 2000, 120.0, 0.0, 400000, KEY_ISSUE)])
    b1 = write_run(tmp_path, "b1", [trial("confirm", 500, 10.0, 1.0, delivered=2000)])
    write_statements(b1, [(100, 2000, 40.0, 0.0, 2000000, STORE)])
    text = report(tmp_path, 500, [("1", "a", a1), ("1", "b", b1), ("2", "a", a2)])

    lines = {tuple(r[:2]): r[2:] for r in rows(text, "a (2 runs)") + rows(text, "b (1 run)")}
    # a's store: a1 0.10 calls, 50 µs executing, 20 planning, 1,000 B a message; a2 0.15, 60,
    # 20, 1,000 (two shards over 2,000 messages): medians 0.125 and 55; rows a call 10 and 6.7.
    assert lines[("a (2 runs)", "store")] == ["0.12", "8.3", "55.0", "20.0", "1,000"]
    # The key issue: 0 in a1, 60 µs in a2 (120 ms over 2,000): median 30.
    assert lines[("a (2 runs)", "body key issue")][2] == "30.0"
    assert lines[("a (2 runs)", "bench setup")][2] == "450.0"  # 600 + 300 (a migration) in a1, none in a2
    # All but the setup: 55 + 27.5 (index: 30 and 25) + 30 executing, not the setup's 900.
    assert lines[("a (2 runs)", "all but the bench's setup")][2] == "112.5"
    assert lines[("b (1 run)", "store")][2:4] == ["20.0", "0.0"]
    assert ("b (1 run)", "user index") in lines  # a group another variant ran shows as 0
    assert lines[("b (1 run)", "user index")][2] == "0.0"


def write_wal(run: Path, records, fpi, wal_bytes, syncs, sync_ms):
    counters = {"records": records, "full_page_images": fpi, "bytes": wal_bytes,
                "buffers_full": 0, "writes": syncs, "syncs": syncs, "write_ms": 0.0,
                "sync_ms": sync_ms}
    (run / "postgres-wal.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in counters.items()))


def test_wal_per_message_of_the_run(tmp_path):
    # 1,000 messages in a1 (two trials), 2,000 in a2; b1 ran without track_wal_io_timing.
    a1 = write_run(tmp_path, "a1", [trial("confirm", 500, 10.0, 1.0, delivered=500),
                                    trial("latency-low", 500, 10.0, 1.0, delivered=500)])
    write_wal(a1, 18000, 100, 2000000, 300, 600.0)
    a2 = write_run(tmp_path, "a2", [trial("confirm", 500, 10.0, 1.0, delivered=2000)])
    write_wal(a2, 40000, 400, 3000000, 400, 400.0)
    b1 = write_run(tmp_path, "b1", [trial("confirm", 500, 10.0, 1.0, delivered=2000)])
    write_wal(b1, 20000, 0, 2000000, 1000, 0.0)
    c1 = write_run(tmp_path, "c1", [trial("confirm", 500, 10.0, 1.0)])  # no file: no row
    text = report(tmp_path, 500, [("1", "a", a1), ("1", "b", b1), ("1", "c", c1), ("2", "a", a2)])

    assert "WAL per message" in text
    # a: 2,000 and 1,500 B a message, 18 and 20 records, 100 and 200 full-page images per 1,000
    # messages, 300 and 200 flushes per 1,000 of 2.0 and 1.0 ms, 600 and 200 flush ms per 1,000.
    assert rows(text, "a (2 runs)") == [["a (2 runs)", "1,750", "19.0", "150.0", "250.0", "1.50",
                                         "400.0"]]
    # b: the flushes were not timed, so their time stays empty rather than 0.
    assert rows(text, "b (1 run)") == [["b (1 run)", "1,000", "10.0", "0.0", "500.0", "", ""]]
    assert rows(text, "c (") == []


def test_no_statements_table_without_the_files(tmp_path):
    a1 = write_run(tmp_path, "a1", [trial("confirm", 500, 10.0, 1.0)])
    assert "statements per message" not in report(tmp_path, 500, [("1", "a", a1)])


def test_the_key_statements_of_both_designs_are_grouped():
    import importlib.util
    spec = importlib.util.spec_from_file_location("ab_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    group = module.statement_group
    # Keys issued ahead (sealing_keys, by id) and, before them, per send (body_keys).
    assert group("INSERT INTO sealing_keys (id, key, created_at_ms) SELECT id, key, $3 "
                 "FROM unnest($1::bytea[], $2::bytea[]) AS u(id, key)") == "body key issue"
    assert group(KEY_ISSUE) == "body key issue"
    assert group("SELECT id, key FROM sealing_keys WHERE id = ANY($1::bytea[])") == "body key read"
    assert group("SELECT k.conversation, k.sender, k.client_message_id, k.key FROM unnest($1) "
                 "AS i(conversation) JOIN body_keys k ON k.conversation = i.conversation") \
        == "body key read"
    assert group("DELETE FROM sealing_keys WHERE id = ANY($1::bytea[])") == "skipped copies' keys"
    # The expiry's sweep of unused keys is not the store's.
    assert group("DELETE FROM sealing_keys WHERE id IN (SELECT id FROM sealing_keys "
                 "WHERE created_at_ms < $1 LIMIT $2)") == "other"


def with_seconds(t, p99s):
    t["delivered_by_second"] = [{"second": i, "delivered": 500, "p50_ms": 4.0, "p99_ms": v,
                                 "max_ms": v + 1.0} for i, v in enumerate(p99s)]
    return t


def test_the_delivered_p99_second_by_second(tmp_path):
    # a: one stall in an otherwise quick trial, then a trial alike throughout; b: every second
    # alike, slower.
    a1 = write_run(tmp_path, "a1", [with_seconds(trial("confirm", 500, 3.0, 1.0),
                                                 [8.0, 9.0, 30.0, 7.0, 10.0]),
                                    with_seconds(trial("latency-low", 500, 3.0, 1.0),
                                                 [8.0, 8.0, 9.0, 8.0])])
    b1 = write_run(tmp_path, "b1", [with_seconds(trial("confirm", 500, 4.0, 1.0),
                                                 [12.0, 11.0, 13.0, 12.0])])
    text = report(tmp_path, 500, [("1", "a", a1), ("1", "b", b1)])
    table = text.split("Delivered p99 second by second", 1)[1].split("\n\n", 2)[1]
    assert rows(table, "1") == [
        ["1", "a", "confirm", "9.0", "5", "9.0", "30.0", "1"],
        ["1", "a", "latency-low", "9.0", "4", "8.0", "9.0", "0"],
        ["1", "b", "confirm", "12.0", "4", "12.0", "13.0", "0"],
    ]
    assert rows(table, "median") == [
        ["median of 2", "a", "", "9.0", "", "8.5", "19.5", "0.5"],
        ["median of 1", "b", "", "12.0", "", "12.0", "13.0", "0.0"],
    ]
    older = write_run(tmp_path, "c1", [trial("confirm", 500, 3.0, 1.0)])
    assert "second by second" not in report(tmp_path, 500, [("1", "c", older)])


@pytest.mark.parametrize("missing, still_there, gone", [
    ("switches", "writes a message", "Context switches"),
    ("machine", "Context switches", "The machine's cores"),
])
def test_no_table_of_what_an_older_load_generator_did_not_read(tmp_path, missing, still_there,
                                                               gone):
    old = trial("confirm", 500, 10.0, 1.0)
    del old["cpu"][missing]
    run = write_run(tmp_path, "a1", [old])
    text = report(tmp_path, 500, [("1", "a", run)])
    assert still_there in text
    assert gone not in text
