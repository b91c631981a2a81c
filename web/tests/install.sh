#!/usr/bin/env bash
# Usage: web/tests/install.sh
#
# Makes a fresh Debian machine ready for the web client's tests: Debian's chromium (if missing)
# and the npm dependencies from package-lock.json (playwright-core only: it drives the system
# chromium and downloads no browser). Node.js >= 20 (playwright-core's minimum) and npm are needed: installed from apt if missing.
set -euo pipefail
WEB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"

apt_install() {
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "$@" >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "$@" >/dev/null; }
}

if [[ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]]; then
  echo "install: chromium (apt)"
  apt_install chromium
fi
command -v curl >/dev/null || { echo "install: curl (apt)"; apt_install curl; }
command -v psql >/dev/null || { echo "install: postgresql-client (apt)"; apt_install postgresql-client; }
if ! command -v npm >/dev/null; then
  echo "install: nodejs and npm (apt)"
  apt_install nodejs npm
fi
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' \
  || { echo "install: node $(node --version) is too old; need >= 20 (https://nodejs.org or NodeSource)" >&2; exit 1; }

echo "install: npm ci in $WEB_DIR"
cd "$WEB_DIR"
npm ci --no-audit --no-fund --loglevel=error
echo "install: ready ($(${CHROMIUM:-/usr/bin/chromium} --version 2>/dev/null | head -n1), playwright-core $(node -p 'require("playwright-core/package.json").version'))"
