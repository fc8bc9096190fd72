#!/usr/bin/env bash
# A throwaway PostgreSQL server on the loopback interface, for the tests of the Optuna storage (and .ci/run).
#
#   tests/scripts/postgres.sh start PORT   installs Debian's postgresql package if missing (apt-get, needs root or
#                                          password-less sudo), creates a cluster in a new /tmp folder, starts it on
#                                          127.0.0.1:PORT and creates the database "optuna"; prints "FOLDER URL"
#   tests/scripts/postgres.sh stop FOLDER  stops that server and removes its folder
#
# The server refuses to run as root, so under root it runs as the `postgres` user the package creates. Trust
# authentication on loopback only: a test server, never a real one.
set -euo pipefail

die() { echo "postgres.sh: $*" >&2; exit 3; }

bin_dir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

as_server_user() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

install_postgres() {
    [ -n "$(bin_dir)" ] && [ -x "$(bin_dir)/initdb" ] && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null && sudo -n true 2>/dev/null || die "PostgreSQL is not installed and installing it needs root: apt-get install postgresql"
        sudo="sudo -n"
    fi
    command -v apt-get >/dev/null || die "PostgreSQL is not installed and this is not a Debian-like system (no apt-get)"
    echo "postgres.sh: installing postgresql with apt-get" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2 \
        || die "apt-get install postgresql failed"
    [ -n "$(bin_dir)" ] || die "postgresql installed but no /usr/lib/postgresql/*/bin found"
}

start() {
    local port="${1:?usage: postgres.sh start PORT}"
    install_postgres
    local bin folder
    bin="$(bin_dir)"
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
    folder="$(mktemp -d /tmp/ssl-bench-postgres.XXXXXX)"
    [ "$(id -u)" -eq 0 ] && chown postgres "$folder"
    as_server_user "$bin/initdb" -D "$folder/data" -U bench -A trust -E UTF8 --no-locale >"$folder/initdb.log" 2>&1 \
        || { cat "$folder/initdb.log" >&2; die "initdb failed"; }
    if ! as_server_user "$bin/pg_ctl" -D "$folder/data" -l "$folder/server.log" -w -t 120 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $folder -c fsync=off -c max_connections=50" start >/dev/null; then
        cat "$folder/server.log" >&2 || true
        die "the server did not start (port $port taken?)"
    fi
    as_server_user "$bin/createdb" -h 127.0.0.1 -p "$port" -U bench optuna || die "createdb failed"
    echo "$folder postgresql://bench@127.0.0.1:$port/optuna"
}

stop() {
    local folder="${1:?usage: postgres.sh stop FOLDER}"
    case "$folder" in /tmp/ssl-bench-postgres.*) ;; *) die "not a folder this script made: $folder";; esac
    as_server_user "$(bin_dir)/pg_ctl" -D "$folder/data" -m fast -w stop >/dev/null || true
    rm -rf "$folder"
}

case "${1:-}" in
    start) shift; start "$@";;
    stop) shift; stop "$@";;
    *) die "usage: postgres.sh start PORT | stop FOLDER";;
esac
