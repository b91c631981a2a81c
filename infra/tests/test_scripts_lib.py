"""Helpers of infra/scripts/lib.sh that other scripts build on, run through bash."""

import subprocess
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "scripts" / "lib.sh"


def dsn_with_db(dsn: str, db: str) -> str:
    out = subprocess.run(["bash", "-c", 'source "$0"; dsn_with_db "$1" "$2"', str(LIB), dsn, db],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


@pytest.mark.parametrize("dsn, want", [
    ("postgres://chat@127.0.0.1:54320/postgres", "postgres://chat@127.0.0.1:54320/shard_1"),
    # The parameters stay, a path inside them among them (the secured stack's DSN).
    ("postgres://owner:pw@127.0.0.1:5433/postgres?sslmode=verify-full&sslrootcert=/x/tls/ca.crt",
     "postgres://owner:pw@127.0.0.1:5433/shard_1?sslmode=verify-full&sslrootcert=/x/tls/ca.crt"),
    ("postgres://h:5432/?sslmode=require", "postgres://h:5432/shard_1?sslmode=require"),
])
def test_a_dsn_gets_another_database_and_keeps_its_parameters(dsn, want):
    assert dsn_with_db(dsn, "shard_1") == want
