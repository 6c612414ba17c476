#!/usr/bin/env bash
# System tools some tests use (man page lint, log rotation, a movable wall clock,
# unit verification, a real systemd, a real Redis). Installed with apt-get when missing and
# possible (root on Debian); otherwise the tests that need them are skipped,
# each saying why.
set -euo pipefail
need=()
command -v mandoc >/dev/null || need+=(mandoc)
command -v logrotate >/dev/null || need+=(logrotate)
compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || need+=(libfaketime)
# the cluster tests start their own redis-server on a free port (never the system's)
command -v redis-server >/dev/null || need+=(redis-server)
# the whole systemd package: its tools, and the systemd that tests/test_systemd_real.py
# boots in a sandbox (never on this machine); `make install` there needs a system python3
# with venv
command -v systemd-analyze >/dev/null && command -v systemd-socket-activate >/dev/null ||
    need+=(systemd)
[ -x /usr/bin/python3 ] && ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null &&
    need+=(python3-venv)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing test tools: ${need[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } \
        >/dev/null || echo "warning: could not install ${need[*]}; their tests will be skipped" >&2
else
    echo "note: ${need[*]} missing and not installable here; their tests will be skipped" >&2
fi
