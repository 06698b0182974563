#!/bin/sh
# Installs what the deployment tests need from Debian's packages: the Prometheus server and
# promtool (package `prometheus`). Run by `make deploy-tools`, a prerequisite of `make test`.
#
# Only the binaries are wanted: the package's own service is stopped and disabled again
# right after a fresh install, so that no stray server keeps port 9090 (the tests start
# their own Prometheus on a free loopback port).
set -eu

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root() { "$@"; }
else
    as_root() { sudo "$@"; }
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "deploy-tools: prometheus/promtool are missing and there is no apt-get;" \
         "install Prometheus 2.x (server and promtool) by other means" >&2
    exit 1
fi

as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus

# The package enables and starts its service where an init system allows it (a Docker-style
# /usr/sbin/policy-rc.d prevents that); undo it either way.
if [ -d /run/systemd/system ]; then
    as_root systemctl disable --now prometheus.service >/dev/null 2>&1 || true
else
    as_root invoke-rc.d prometheus stop >/dev/null 2>&1 || true
    as_root update-rc.d prometheus disable >/dev/null 2>&1 || true
fi

command -v prometheus >/dev/null && command -v promtool >/dev/null
