#!/usr/bin/env bash
# Install the system packages the test suite needs, only when they are missing.
#
# Today that is Debian's `prometheus` package, which provides `prometheus`
# (the deploy/ integration test scrapes the service with a real one) and
# `promtool` (checks and unit-tests deploy/prometheus/rules.yml).
# Idempotent and quiet: does nothing when both binaries are on PATH.
set -euo pipefail

missing=()
for bin in prometheus promtool; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_system_deps: missing ${missing[*]} and no apt-get; install Prometheus >= 2.37 by hand" >&2
    exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "ensure_system_deps: missing ${missing[*]}; run as root or install sudo" >&2
        exit 1
    fi
fi

echo "ensure_system_deps: installing Debian package prometheus (for ${missing[*]})" >&2
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq >/dev/null
# The package's postinst tries to start a system service; in containers
# policy-rc.d refuses, which is fine: the tests run their own instance.
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v prometheus >/dev/null && command -v promtool >/dev/null
