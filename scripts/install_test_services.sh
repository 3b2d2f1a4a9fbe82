#!/usr/bin/env bash
# Installs the services the integration tests run for real (today: nginx, for
# tests/integration/test_nginx.py). Idempotent and quiet. It never fails the
# build: where it cannot install, it says why in one line and exits 0, and the
# tests that need the service skip with that reason.
#
# Debian 12 (bookworm): the package `nginx` holds the server with every module
# the shipped configuration uses (upstream keepalive, limit_conn, limit_req,
# map); `nginx-light` only adds the echo module on top of it, so `nginx` is
# tried first and `nginx-light` only where `nginx` is not a package.
set -u

say() { echo "install_test_services: $*"; }

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    say "nginx is not installed and this user is not root; the nginx tests will skip"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    say "nginx is not installed and there is no apt-get; the nginx tests will skip"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive

# Keep the package from starting a system nginx on port 80 while it installs
# (the standard Debian policy hook; left alone where one already exists).
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && own_policy=1
fi
cleanup() { if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

install_nginx() {
    apt-get install -y -q --no-install-recommends nginx >/dev/null 2>&1 \
        || apt-get install -y -q --no-install-recommends nginx-light >/dev/null 2>&1
}

if ! install_nginx; then
    # Empty or stale package lists: update them once, then try again.
    if ! apt-get update -q >/dev/null 2>&1; then
        say "apt-get update failed; nginx is not installed and the nginx tests will skip"
        exit 0
    fi
    if ! install_nginx; then
        say "apt-get install nginx failed; the nginx tests will skip"
        exit 0
    fi
fi

# Should the package have started a system nginx anyway (an existing policy
# hook allowed it), stop it: the tests start their own on free ports.
if [ -e /run/nginx.pid ]; then
    service nginx stop >/dev/null 2>&1 || nginx -s quit >/dev/null 2>&1 || true
fi

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    say "installed $(/usr/sbin/nginx -v 2>&1)"
else
    say "nginx still not found after installing; the nginx tests will skip"
fi
exit 0
