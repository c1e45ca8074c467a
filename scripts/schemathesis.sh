#!/usr/bin/env bash
# scripts/schemathesis.sh — Schemathesis (property-based API testing) against the OpenAPI document
# a running `parley` serves, with every check, as a dev user. Exits non-zero on any failure.
#
# Installs the pinned Schemathesis into a virtualenv when missing (PyPI, through pip), starts
# `parley serve` on 127.0.0.1:0 with a throwaway data folder, signs a token for the user
# `schemathesis` with `parley token`, runs `st run`, and stops the server however it ends.
# Called by scripts/test.sh (full runs); alone:
#
#   PARLEY_BIN=/path/to/parley scripts/schemathesis.sh
#
# PARLEY_SCHEMATHESIS_EXAMPLES (default 30) bounds the test cases per operation and phase,
# PARLEY_SCHEMATHESIS_SEED (default 1) makes a run repeatable; PARLEY_SCHEMATHESIS_VENV (default
# ~/.cache/parley-schemathesis) is where Schemathesis is installed. Reports go to
# $PARLEY_ARTIFACTS_DIR/schemathesis (default target dir's schemathesis/).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SCHEMATHESIS_VERSION=4.32.5
target_dir="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/parley-target}"
bin="${PARLEY_BIN:-$target_dir/debug/parley}"
venv="${PARLEY_SCHEMATHESIS_VENV:-${HOME:-/root}/.cache/parley-schemathesis}"
examples="${PARLEY_SCHEMATHESIS_EXAMPLES:-30}"
seed="${PARLEY_SCHEMATHESIS_SEED:-1}"
reports="$(realpath -m "${PARLEY_ARTIFACTS_DIR:-$target_dir}/schemathesis")"

if [ ! -x "$bin" ]; then
    echo "schemathesis.sh: no parley binary at $bin; build it (cargo build -p parley --locked) or set PARLEY_BIN" >&2
    exit 1
fi

# --- Schemathesis, pinned -------------------------------------------------------------------
st="$venv/bin/st"
if [ ! -x "$st" ] || [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" != "$SCHEMATHESIS_VERSION" ]; then
    if ! command -v python3 >/dev/null 2>&1; then
        echo "schemathesis.sh: python3 (>= 3.9, with venv) is needed to install Schemathesis" >&2
        exit 1
    fi
    echo "schemathesis.sh: installing schemathesis==$SCHEMATHESIS_VERSION into $venv" >&2
    python3 -m venv "$venv" || {
        echo "schemathesis.sh: python3 -m venv failed; apt-get install python3-venv" >&2
        exit 1
    }
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

# --- the server -----------------------------------------------------------------------------
work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# Development mode (generated key), budgets far above what the run sends: rate limits are
# tested elsewhere, and a 429 here would only hide what the generated requests reach.
PARLEY_LOG="${PARLEY_LOG:-warn}" "$bin" serve --listen 127.0.0.1:0 --data-dir "$work/data" \
    --rate-per-minute 1000000 --rate-burst 1000000 >"$work/stdout" 2>"$work/stderr" &
server_pid=$!
url=""
for _ in $(seq 150); do
    url="$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$work/stdout" 2>/dev/null | head -n1 || true)"
    [ -n "$url" ] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$url" ]; then
    echo "schemathesis.sh: parley did not start; its stderr:" >&2
    cat "$work/stderr" >&2
    exit 1
fi
token="$("$bin" token --user schemathesis --data-dir "$work/data")"

# --- the run --------------------------------------------------------------------------------
mkdir -p "$reports"
echo "schemathesis.sh: st run $url/v1/openapi.json --checks all -n $examples --seed $seed" >&2
status=0
# From the throwaway folder: Schemathesis keeps its example database in ./.schemathesis.
(cd "$work" && timeout 900 "$st" run "$url/v1/openapi.json" \
    --header "Authorization: Bearer $token" \
    --checks all \
    --max-examples "$examples" \
    --seed "$seed" \
    --no-color \
    --report junit --report-dir "$reports") \
    || status=$?
if [ "$status" -ne 0 ]; then
    echo "schemathesis.sh: failures (exit $status); server log: $reports/parley-stderr.log" >&2
    cp "$work/stderr" "$reports/parley-stderr.log" || true
fi
exit "$status"
