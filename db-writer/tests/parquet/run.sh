#!/usr/bin/env bash
# Runs one of the Python checks of this folder in the venv .local/venv-parquet, which it creates
# on first use and re-installs from requirements.txt whenever that file changes (concurrent
# callers wait for each other). Usage:
#   db-writer/tests/parquet/run.sh read_export.py FILE    # a Parquet export as JSON
#   db-writer/tests/parquet/run.sh locator.py SHARDS KEY... # the locator, reimplemented
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
venv="$root/.local/venv-parquet"
stamp="$venv/.requirements.sha256"

mkdir -p "$root/.local"
exec 9>"$root/.local/venv-parquet.lock"
flock 9
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
  echo "$want" >"$stamp"
fi
flock -u 9

script="$1"
shift
export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" "$here/$script" "$@"
