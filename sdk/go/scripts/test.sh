#!/usr/bin/env bash
# sdk/go/scripts/test.sh — the Go SDK's checks: go vet, the examples build, and every test
# (with the race detector) against a real `parley` binary.
#
# Needs PARLEY_BIN (the server binary); without it the tests look at
# ${CARGO_TARGET_DIR:-<repository>/target}/debug/parley and fail, saying how to build it,
# when it is not there. Extra arguments go to `go test` (e.g. -run TestChatFlow -v).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v go >/dev/null 2>&1; then
    echo "sdk/go/scripts/test.sh: the go toolchain is not on PATH" >&2
    exit 1
fi

if [ -z "${PARLEY_BIN:-}" ]; then
    default="${CARGO_TARGET_DIR:-$(cd ../.. && pwd)/target}/debug/parley"
    if [ -x "$default" ]; then
        export PARLEY_BIN="$default"
    else
        echo "sdk/go/scripts/test.sh: PARLEY_BIN is unset and $default does not exist;" >&2
        echo "  build the server first: (cd \"\$(git rev-parse --show-toplevel)\" && cargo build -p parley --locked)" >&2
        exit 1
    fi
fi
echo "==> sdk/go: server binary $PARLEY_BIN" >&2

# No VCS stamping: builds must not depend on the state of the git checkout.
export GOFLAGS="${GOFLAGS:--buildvcs=false}"

# Modules: only when the module cache lacks them (go mod download is a no-op otherwise).
if ! go list -m all >/dev/null 2>&1; then
    go mod download
fi

echo "==> sdk/go: go vet" >&2
go vet ./...
echo "==> sdk/go: go build ./examples/..." >&2
go build ./examples/...   # several main packages: built and discarded
echo "==> sdk/go: go test -race" >&2
# Each test bounds its own waits; -timeout is the backstop for the whole run.
go test -race -count=1 -timeout 300s "$@" ./...
# The failover test again with real edges: two `--role edge` processes (edge NATS credentials)
# in front of one `--role core` (issue 11: the SDKs fail over between edges).
if [ "$#" -eq 0 ]; then
  echo "==> sdk/go: go test -race -run TestFailoverKillNode with PARLEY_TEST_TOPOLOGY=split" >&2
  PARLEY_TEST_TOPOLOGY=split go test -race -count=1 -timeout 120s -run 'TestFailoverKillNode' .
fi
