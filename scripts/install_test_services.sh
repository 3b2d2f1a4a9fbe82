#!/usr/bin/env bash
# Installs the services the integration tests run for real: nginx (for
# tests/integration/test_nginx.py), PostgreSQL's server (for the
# collection tests against PostgreSQL: tests/postgres.py makes a throwaway
# cluster with its initdb and pg_ctl) and headless Chromium (for
# tests/integration/test_status_page.py, which loads the status page in it). Idempotent and quiet. It never fails
# the build: where it cannot install, it says why in one line and exits 0,
# and the tests that need the service skip with that reason.
#
# Debian 12 (bookworm): the package `nginx` holds the server with every module
# the shipped configuration uses (upstream keepalive, limit_conn, limit_req,
# map); `nginx-light` only adds the echo module on top of it, so `nginx` is
# tried first and `nginx-light` only where `nginx` is not a package. The
# package `postgresql` pulls the distribution's current server
# (postgresql-15 on bookworm); its tools land in /usr/lib/postgresql/<v>/bin.
# The package `chromium` runs headless as it is (no X server); without its
# recommended packages it is about 25 packages.
set -u

say() { echo "install_test_services: $*"; }

have_nginx() { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; }
have_chromium() { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }

# The server's tools, where tests/postgres.py looks for them: `pg_config --bindir`,
# PATH, or /usr/lib/postgresql/*/bin.
has_pg_tools() { [ -x "$1/initdb" ] && [ -x "$1/pg_ctl" ] && [ -x "$1/postgres" ]; }
have_postgres() {
    local dir
    if command -v pg_config >/dev/null 2>&1; then
        dir=$(pg_config --bindir 2>/dev/null) && has_pg_tools "$dir" && return 0
    fi
    if command -v initdb >/dev/null 2>&1; then
        dir=$(dirname "$(readlink -f "$(command -v initdb)")") && has_pg_tools "$dir" && return 0
    fi
    for dir in /usr/lib/postgresql/*/bin; do
        has_pg_tools "$dir" && return 0
    done
    return 1
}

missing=()
have_nginx || missing+=(nginx)
have_postgres || missing+=(postgresql)
have_chromium || missing+=(chromium)
if [ ${#missing[@]} = 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    for service in "${missing[@]}"; do
        say "$service is not installed and this user is not root; the $service tests will skip"
    done
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    for service in "${missing[@]}"; do
        say "$service is not installed and there is no apt-get; the $service tests will skip"
    done
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive

# Keep the packages from starting a system nginx on port 80 or a system
# PostgreSQL on 5432 while they install (the standard Debian policy hook;
# left alone where one already exists).
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && own_policy=1
fi
cleanup() { if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

# One service's packages, in order of preference.
packages_of() {
    case "$1" in
        nginx) echo "nginx nginx-light" ;;
        postgresql) echo "postgresql" ;;
        chromium) echo "chromium" ;;
    esac
}

install_one() {
    local package
    for package in $(packages_of "$1"); do
        apt-get install -y -q --no-install-recommends "$package" >/dev/null 2>&1 && return 0
    done
    return 1
}

updated=0
for service in "${missing[@]}"; do
    if ! install_one "$service"; then
        # Empty or stale package lists: update them once, then try again.
        if [ "$updated" = 0 ]; then
            updated=1
            if ! apt-get update -q >/dev/null 2>&1; then
                say "apt-get update failed; $service is not installed and the $service tests will skip"
                continue
            fi
        fi
        if ! install_one "$service"; then
            say "apt-get install $service failed; the $service tests will skip"
            continue
        fi
    fi
    case "$service" in
        nginx)
            # Should the package have started a system nginx anyway (an existing policy
            # hook allowed it), stop it: the tests start their own on free ports.
            if [ -e /run/nginx.pid ]; then
                service nginx stop >/dev/null 2>&1 || nginx -s quit >/dev/null 2>&1 || true
            fi
            if have_nginx; then
                say "installed $(/usr/sbin/nginx -v 2>&1)"
            else
                say "nginx still not found after installing; the nginx tests will skip"
            fi
            ;;
        postgresql)
            # Likewise a system cluster: the tests make their own in a temporary folder.
            if compgen -G "/var/run/postgresql/*.pid" >/dev/null; then
                service postgresql stop >/dev/null 2>&1 || true
            fi
            if have_postgres; then
                say "installed PostgreSQL $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sed 's|.*/postgresql/||; s|/bin||' | tr '\n' ' ')"
            else
                say "PostgreSQL's server still not found after installing; the postgresql tests will skip"
            fi
            ;;
        chromium)
            if have_chromium; then
                say "installed $(chromium --version 2>/dev/null | head -1)"
            else
                say "chromium still not found after installing; the status page test will skip"
            fi
            ;;
    esac
done
exit 0
