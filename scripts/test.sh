#!/usr/bin/env bash
# scripts/test.sh — THE test command of Parley.
#
# Installs (if missing) and starts PostgreSQL, Redis and NATS on private 127.0.0.1 ports
# (scripts/services.sh), runs the whole workspace's tests against them, and stops them
# again however the run ends. Tests find the services through PARLEY_TEST_DATABASE_URL,
# PARLEY_TEST_REDIS_URL and PARLEY_TEST_NATS_URL; they must fail, not skip, without them.
#
# A full run (no arguments) then runs the client suites against the `parley` binary the Rust
# tests built: sdk/js (vitest, Node and Chromium), sdk/go (go vet, go test -race) and web/
# (the web client's checks and its browser tests, playwright-core + Debian's Chromium), and
# Schemathesis against the served OpenAPI document (scripts/schemathesis.sh). Each installs what
# it needs when missing (npm ci, Go modules, apt-get install chromium, pip install schemathesis).
# Screenshots and logs of the browser tests go to $PARLEY_ARTIFACTS_DIR (default
# web/e2e/artifacts).
#
# Extra arguments go to `cargo test` (and skip the client suites):
#   scripts/test.sh                         # everything
#   scripts/test.sh -p parley-proto         # one crate
#   scripts/test.sh -p parley-core -- --nocapture
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Build where `cargo run` builds (the clone's ./target), so the README's two commands share one
# build. CI (.ci/run) sets CARGO_TARGET_DIR to a warm dir outside the clone instead.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

# The shared target dir grows with every change built into it (incremental caches, stale test
# binaries); once it filled the disk and a run failed with ENOSPC. When the disk it lives on has
# less than PARLEY_MIN_FREE_GIB (default 12) free, drop its incremental caches, then the whole
# dir if that was not enough: a cold build is slower than a warm one, but it finishes.
free_gib() { df -Pk "$1" | awk 'NR == 2 { print int($4 / 1048576) }'; }
ensure_disk_space() {
    local min=${PARLEY_MIN_FREE_GIB:-12} free
    mkdir -p "$CARGO_TARGET_DIR"
    free=$(free_gib "$CARGO_TARGET_DIR")
    [ "$free" -lt "$min" ] || return 0
    echo "test.sh: only $free GiB free next to $CARGO_TARGET_DIR (want $min); removing its incremental caches" >&2
    rm -rf "$CARGO_TARGET_DIR"/*/incremental
    free=$(free_gib "$CARGO_TARGET_DIR")
    [ "$free" -lt "$min" ] || return 0
    echo "test.sh: still only $free GiB free; removing $CARGO_TARGET_DIR (the build starts cold)" >&2
    rm -rf "${CARGO_TARGET_DIR:?}"/*
    free=$(free_gib "$CARGO_TARGET_DIR")
    [ "$free" -ge "$min" ] || echo "test.sh: warning: $free GiB free after that; the build may run out of space" >&2
}
ensure_disk_space

# shellcheck source=scripts/services.sh
. scripts/services.sh

# Run one phase and print a one-line summary of it: name, ok/FAILED, time.
phase() { # NAME CMD...
    local name=$1 t0 rc=0
    shift
    t0=$(_parley_now_ms)
    echo "==> test.sh: $name ..." >&2
    "$@" || rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "==> test.sh: $name: ok ($(_parley_since "$t0"))" >&2
    else
        echo "==> test.sh: $name: FAILED with exit $rc ($(_parley_since "$t0"))" >&2
    fi
    return "$rc"
}

# Stop the services on any exit; INT/TERM become exits so that the EXIT trap runs. While
# stopping, INT/TERM are ignored: a second Ctrl-C must not cut the cleanup short.
trap 'trap "" INT TERM; parley_services_stop || true' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

phase "install services" parley_services_install
# promtool checks the alert rules in ops/ (parley/tests/ops_assets.rs); Debian's prometheus
# package brings it (no daemon is started).
install_promtool() {
    command -v promtool >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || { echo "test.sh: promtool missing and no apt-get: install Prometheus' promtool" >&2; return 1; }
    # On a new machine the package lists may be empty: fetch them once when the install fails.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
}
phase "install promtool" install_promtool
phase "start services" parley_services_start

# Belt and braces: never hand the tests an environment they would have to skip in.
for var in PARLEY_TEST_DATABASE_URL PARLEY_TEST_REDIS_URL PARLEY_TEST_NATS_URL; do
    if [ -z "${!var:-}" ]; then
        echo "test.sh: $var is not set after starting the services; see the messages above" >&2
        exit 1
    fi
done
# The NATS URL carries the test server's core password: shown without it.
echo "test.sh: $PARLEY_TEST_DATABASE_URL $PARLEY_TEST_REDIS_URL $(printf '%s' "$PARLEY_TEST_NATS_URL" | sed -E 's#(//[^:/@]*):[^@]*@#\1:***@#') (target dir $CARGO_TARGET_DIR)" >&2

# --workspace, unless the arguments choose packages themselves (-p/--package/--manifest-path).
cargo_args=(--locked --no-fail-fast)
scope=--workspace
for arg in "$@"; do
    [ "$arg" != -- ] || break # what follows `--` belongs to the test binaries
    case "$arg" in
    -p | -p* | --package | --package=* | --manifest-path | --manifest-path=*) scope="" ;;
    esac
done
[ -z "$scope" ] || cargo_args=("$scope" "${cargo_args[@]}")

# Every suite runs even when an earlier one failed, so one run shows every failure.
failed=()
phase "cargo test ${cargo_args[*]}${*:+ $*}" cargo test "${cargo_args[@]}" "$@" || failed+=("cargo test")

# --- client suites (full runs only) -------------------------------------------------
if [ $# -eq 0 ]; then
    # The multi-node tests again with every node split into a `--role edge` (as the NATS edge
    # user) in front of its own `--role core` (parley/tests/common: PARLEY_TEST_TOPOLOGY). One
    # test at a time: every core on the shared test NATS answers in the one queue group, so a
    # test's edge may reach another test's core, which that test may be killing.
    split_tests=(multinode presence_multinode calls_multinode channel_added drain interest resume)
    phase "cargo test, split topology (${split_tests[*]})" \
        env PARLEY_TEST_TOPOLOGY=split cargo test --locked -p parley \
        $(printf -- '--test %s ' "${split_tests[@]}") -- --test-threads 1 ||
        failed+=("cargo test (split topology)")
    # The binary the Rust integration tests used; rebuilt here only if they did not build it.
    export PARLEY_BIN="$CARGO_TARGET_DIR/debug/parley"
    if [ ! -x "$PARLEY_BIN" ]; then
        phase "cargo build -p parley" cargo build -p parley --locked || failed+=("cargo build")
    fi
    phase "sdk/js" sdk/js/scripts/test.sh || failed+=("sdk/js")
    phase "sdk/go" sdk/go/scripts/test.sh || failed+=("sdk/go")
    phase "web" web/scripts/test.sh || failed+=("web")
    # Schemathesis against the served OpenAPI document, every check (bounded: a few minutes).
    phase "schemathesis" scripts/schemathesis.sh || failed+=("schemathesis")
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "==> test.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "==> test.sh: all phases passed" >&2
