#!/usr/bin/env bash
# Offline checks of infra/terraform and infra/observability (no terraform binary, no cloud), and
# of the bench's report scripts (bench/test_*.py).
# Creates the venv .local/venv-infra on first use, installs requirements.txt (again whenever
# it changes), then runs pytest. Extra arguments go to pytest.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/.local/venv-infra"
stamp="$venv/.requirements.sha256"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi

want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  echo "$want" >"$stamp"
fi

cd "$root"
export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$here" "$root/bench" "$@"
