#!/usr/bin/env bash
# Install the system packages the test suite needs, when that needs no prompt.
#
# Today that is Debian's `prometheus` package, which provides `prometheus`
# (the deploy/ integration tests scrape the service with a real one) and
# `promtool` (checks and unit-tests deploy/prometheus/rules.yml).
#
# Does nothing when both are on PATH. Otherwise installs the package with
# apt-get, but only when nothing would ask for a password: as root, or through
# passwordless sudo (`sudo -n`). When it cannot, it says why in one line and
# exits 0: the tests that need the binaries are then skipped, with one line in
# pytest's summary (under CI=true they fail instead; see tests/conftest.py).
#
#   --require   exit 1 instead when the binaries are missing at the end
#               (make rules-check: nothing to skip there)
set -euo pipefail

require=0
case "${1:-}" in
    "") ;;
    --require) require=1 ;;
    *) echo "usage: $0 [--require]" >&2; exit 2 ;;
esac

missing=()
for bin in prometheus promtool; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

give_up() {
    echo "ensure_system_deps: ${missing[*]} not installed ($1): apt-get install prometheus (Prometheus >= 2.37), or run as root" >&2
    exit "$require"
}

command -v apt-get >/dev/null 2>&1 || give_up "no apt-get on this machine"

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif ! command -v sudo >/dev/null 2>&1; then
    give_up "not root, and no sudo"
elif sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    give_up "not root, and sudo would ask for a password"
fi
apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300)

echo "ensure_system_deps: installing Debian package prometheus (for ${missing[*]})" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The package's postinst tries to start a system service; in containers
# policy-rc.d refuses, which is fine: the tests run their own instance.
if ! { "${apt[@]}" update -qq && "${apt[@]}" install -y -qq --no-install-recommends prometheus; } \
        >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    give_up "apt-get install prometheus failed"
fi
for bin in prometheus promtool; do
    command -v "$bin" >/dev/null 2>&1 || give_up "the package did not provide $bin"
done
