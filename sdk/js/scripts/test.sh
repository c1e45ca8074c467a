#!/usr/bin/env bash
# The TypeScript SDK's whole suite: install (when needed), build, type-check, unit and integration
# tests against the real `parley` binary. Called by the project's scripts/test.sh.
#
#   PARLEY_BIN=/path/to/parley sdk/js/scripts/test.sh [vitest arguments...]
#
# PARLEY_BIN defaults to the debug build in $CARGO_TARGET_DIR (default: the repository's ./target).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

target_dir="${CARGO_TARGET_DIR:-$(cd ../.. && pwd)/target}"
export PARLEY_BIN="${PARLEY_BIN:-$target_dir/debug/parley}"
if [[ ! -x "$PARLEY_BIN" ]]; then
  echo "sdk/js: no parley binary at PARLEY_BIN=$PARLEY_BIN" >&2
  echo "sdk/js: build it first:  cargo build -p parley --locked   (from the repository root)" >&2
  echo "sdk/js: or point PARLEY_BIN at a built parley binary" >&2
  exit 1
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "sdk/js: node and npm are needed (Node >= 20)" >&2
  exit 1
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if (( node_major < 20 )); then
  echo "sdk/js: Node >= 20 is needed, found $(node --version)" >&2
  exit 1
fi

# The calls test runs two real Chromium pages (Debian's package, driven by playwright-core).
export PARLEY_CHROMIUM="${PARLEY_CHROMIUM:-/usr/bin/chromium}"
if [[ ! -x "$PARLEY_CHROMIUM" ]]; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "sdk/js: installing chromium (apt-get) for the calls test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
  if [[ ! -x "$PARLEY_CHROMIUM" ]]; then
    echo "sdk/js: no Chromium at PARLEY_CHROMIUM=$PARLEY_CHROMIUM: apt-get install chromium (as root), or point PARLEY_CHROMIUM at one" >&2
    exit 1
  fi
fi

if [[ ! -d node_modules || package-lock.json -nt node_modules ]]; then
  echo "sdk/js: npm ci"
  npm ci --no-audit --no-fund
  touch node_modules
fi

# Type-check first, on a tree without a build (as in a fresh clone): the examples import
# `@parley/sdk`, which tsconfig's `paths` maps to src/, so `npm run typecheck` needs no build.
rm -rf dist
echo "sdk/js: tsc --noEmit (before any build)"
npx --no-install tsc --noEmit

echo "sdk/js: build (tsup)"
npx --no-install tsup --silent

echo "sdk/js: vitest (unit + integration, parley at $PARLEY_BIN)"
results="$(mktemp)"
trap 'rm -f "$results"' EXIT
status=0
npx --no-install vitest run --reporter=default --reporter=json --outputFile.json="$results" "$@" || status=$?
# One closing line in the plain form every runner's summary is read in.
node -e '
  const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  const skipped = r.numPendingTests + r.numTodoTests;
  console.log(`sdkjs: ${r.numPassedTests} passed, ${r.numFailedTests} failed` + (skipped ? `, ${skipped} skipped` : ""));
' "$results" || echo "sdkjs: vitest wrote no results" >&2
# The failover test again with real edges: two `--role edge` processes (edge NATS credentials)
# in front of one `--role core` (issue 11: the SDKs fail over between edges).
if [ "$#" -eq 0 ]; then
  echo "sdk/js: vitest failover with PARLEY_TEST_TOPOLOGY=split (edges + a core)"
  PARLEY_TEST_TOPOLOGY=split npx --no-install vitest run test/integration/failover.test.ts || status=$?
fi
exit "$status"
