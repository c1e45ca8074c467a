#!/usr/bin/env bash
# Checks and browser tests of the web client:
#   1. Chromium (/usr/bin/chromium, Debian's package) is there, installed with apt-get if not;
#   2. npm ci in web/ when node_modules is missing or older than package-lock.json;
#   3. tsc --noEmit (the app, strict, and the tests);
#   4. web/dist is what the sources build (rebuilt into a temporary folder and compared);
#   5. the browser tests in web/e2e (node --test), against $PARLEY_BIN (default: the debug build
#      in $CARGO_TARGET_DIR, or in the repository's ./target where `cargo run` builds).
# Screenshots and server logs go to $PARLEY_ARTIFACTS_DIR, or web/e2e/artifacts.
# The Go peer test builds sdk/go/examples/callpeer with `go build`.
set -euo pipefail

web="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

fail() {
  echo "web/scripts/test.sh: $*" >&2
  exit 1
}

# Paths given relative to where the script was called from.
if [ -z "${PARLEY_BIN:-}" ]; then
  PARLEY_BIN="${CARGO_TARGET_DIR:-$(cd "$web/.." && pwd)/target}/debug/parley"
  [ -x "$PARLEY_BIN" ] || fail "no server at $PARLEY_BIN: build it with \`cargo build -p parley --locked\` (from the repository root), or point PARLEY_BIN at a parley binary"
fi
[ -x "$PARLEY_BIN" ] || fail "PARLEY_BIN=$PARLEY_BIN is not an executable file"
export PARLEY_BIN="$(cd "$(dirname "$PARLEY_BIN")" && pwd)/$(basename "$PARLEY_BIN")"
if [ -n "${PARLEY_ARTIFACTS_DIR:-}" ]; then
  mkdir -p "$PARLEY_ARTIFACTS_DIR"
  export PARLEY_ARTIFACTS_DIR="$(cd "$PARLEY_ARTIFACTS_DIR" && pwd)"
fi
if [ -n "${PARLEY_CALLPEER:-}" ]; then
  [ -x "$PARLEY_CALLPEER" ] || fail "PARLEY_CALLPEER=$PARLEY_CALLPEER is not an executable file"
  export PARLEY_CALLPEER="$(cd "$(dirname "$PARLEY_CALLPEER")" && pwd)/$(basename "$PARLEY_CALLPEER")"
fi
cd "$web"

# ---- Chromium ----
chromium="${PARLEY_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "web/scripts/test.sh: installing Chromium (apt-get install -y chromium)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed; install Chromium yourself: apt-get install -y chromium"
    apt-get install -y -qq chromium >/dev/null || fail "apt-get install chromium failed; install Debian's chromium package yourself"
  else
    fail "Chromium is missing at $chromium. Install Debian's package as root (apt-get install -y chromium), or set PARLEY_CHROMIUM to a Chromium binary"
  fi
  [ -x "$chromium" ] || fail "Chromium is still missing at $chromium after apt-get install"
fi

# ---- node and packages ----
command -v node >/dev/null || fail "node is missing (Node 20 or newer is needed)"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 20 ] || fail "Node $node_major is too old: Node 20 or newer is needed"
lock_sum="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [ ! -f node_modules/.parley-lock-sum ] || [ "$(cat node_modules/.parley-lock-sum)" != "$lock_sum" ]; then
  echo "web/scripts/test.sh: npm ci"
  npm ci --no-audit --no-fund >/dev/null || fail "npm ci failed in web/"
  echo "$lock_sum" > node_modules/.parley-lock-sum
fi

# ---- static checks ----
echo "web/scripts/test.sh: tsc --noEmit (app and tests)"
npx --no-install tsc --noEmit -p tsconfig.json || fail "type errors in web/src (or the sdk/js sources it bundles)"
npx --no-install tsc --noEmit -p e2e/tsconfig.json || fail "type errors in web/e2e"
node scripts/check-dist.mjs || fail "web/dist is out of date"

# ---- the Go call peer, for the Go ↔ browser call test ----
callpeer_src="$web/../sdk/go/examples/callpeer"
if [ -z "${PARLEY_CALLPEER:-}" ] && [ -d "$callpeer_src" ]; then
  command -v go >/dev/null || fail "go is missing: it builds sdk/go/examples/callpeer for the Go ↔ browser call test"
  bin_dir="$(mktemp -d)"
  trap 'rm -rf "$bin_dir"' EXIT
  echo "web/scripts/test.sh: go build sdk/go/examples/callpeer"
  (cd "$web/../sdk/go" && go build -o "$bin_dir/callpeer" ./examples/callpeer) || fail "go build of sdk/go/examples/callpeer failed"
  export PARLEY_CALLPEER="$bin_dir/callpeer"
fi

# ---- browser tests ----
node scripts/build-e2e.mjs
echo "web/scripts/test.sh: browser tests (Chromium $("$chromium" --version 2>/dev/null | head -1 | grep -o '[0-9][0-9.]*' | head -1))"
timeout --kill-after=10 600 node --test --test-concurrency=1 e2e/.build/ || fail "browser tests failed (screenshots and logs: ${PARLEY_ARTIFACTS_DIR:-$web/e2e/artifacts})"
