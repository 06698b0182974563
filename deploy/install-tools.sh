#!/bin/sh
# Installs what the deployment and console tests need from Debian's packages: the Prometheus
# server and promtool (package `prometheus`), and a headless browser (package `chromium`) for
# tests/serving/test_console_browser.py. Run by `make deploy-tools`, a prerequisite of `make test`.
# Only what is missing is installed; with both present this exits at once.
#
# Only Prometheus's binaries are wanted: the package's own service is stopped and disabled again
# right after a fresh install, so that no stray server keeps port 9090 (the tests start
# their own Prometheus on a free loopback port).
set -eu

missing=""
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    missing="prometheus"
fi
if ! command -v chromium >/dev/null 2>&1; then
    missing="$missing chromium"
fi
if [ -z "$missing" ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root() { "$@"; }
else
    as_root() { sudo "$@"; }
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "deploy-tools: missing:$missing, and there is no apt-get; install Prometheus 2.x" \
         "(server and promtool) and Chromium by other means" >&2
    exit 1
fi

as_root apt-get update -qq
# shellcheck disable=SC2086  # $missing is a list of package names
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing

case "$missing" in
*prometheus*)
    # The package enables and starts its service where an init system allows it (a Docker-style
    # /usr/sbin/policy-rc.d prevents that); undo it either way.
    if [ -d /run/systemd/system ]; then
        as_root systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    else
        as_root invoke-rc.d prometheus stop >/dev/null 2>&1 || true
        as_root update-rc.d prometheus disable >/dev/null 2>&1 || true
    fi
    ;;
esac

command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v chromium >/dev/null
