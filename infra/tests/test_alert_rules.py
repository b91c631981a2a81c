"""The alert rules under promtool, Prometheus's own checker.

- alerts.yml and prometheus.yml load (`promtool check rules`, `promtool check config`).
- Every alert behaves as its unit tests in alerts.test.yml say (`promtool test rules`), and every
  alert has a case where it fires and one where it stays silent.

promtool comes with Debian's prometheus package; `make deps` installs it (install-deps.sh
promtool). Without it these tests fail, unless CHAT_SKIP_PROMTOOL=1 says to skip them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "infra" / "observability" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CHAT_SKIP_PROMTOOL") == "1":
            pytest.skip("promtool is not installed (CHAT_SKIP_PROMTOOL=1)")
        pytest.fail(
            "promtool is not installed: `make deps` installs it (Debian's prometheus package); "
            "CHAT_SKIP_PROMTOOL=1 skips these tests"
        )
    return subprocess.run(
        [path, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120, check=False
    )


def test_rules_and_config_load() -> None:
    for args in (("check", "rules", ALERTS.name), ("check", "config", "prometheus.yml")):
        r = promtool(*args)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}"


def test_alert_unit_tests_pass() -> None:
    r = promtool("test", "rules", ALERT_TESTS.name)
    assert r.returncode == 0, f"promtool test rules {ALERT_TESTS.name}:\n{r.stdout}{r.stderr}"
    assert "SUCCESS" in r.stdout, r.stdout


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    doc = yaml.safe_load(ALERT_TESTS.read_text())
    assert doc["rule_files"] == [ALERTS.name]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert (fires | silent) <= alerts, f"tests of unknown alerts: {(fires | silent) - alerts}"
    assert not alerts - fires, f"no case where these fire: {sorted(alerts - fires)}"
    assert not alerts - silent, f"no case where these stay silent: {sorted(alerts - silent)}"
