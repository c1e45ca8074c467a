#!/usr/bin/env bash
# The 50,000-connection benchmark of issue 11 §8 (bench/src/bin/edge_scale.rs): one core, three
# edges, nats-server and PostgreSQL (from scripts/services.sh, on loopback, stopped at the end),
# and load-generator processes, every process capped at 20,000 open files.
#
#   bench/scripts/edge_scale.sh [edge_scale run flags...]
#
# TOPOLOGY=all (default) runs the core and the edges as `parley serve` nodes of today's
# `--role all`, on the shared PostgreSQL and NATS (the "core" is the node that holds no client
# connection and takes the REST setup and the fan-out sends); TOPOLOGY=split runs
# `--role core` + `--role edge` processes. That is the only difference.
# Other knobs: NOFILE (default 20000), CARGO_TARGET_DIR. Flags go to `edge_scale run`
# (`--connections 50000 --edges 3 --generators 4 --rate 1000 --duration-secs 20 ...`;
# `edge_scale run --help` lists them). Output: figures on stdout, a SUMMARY line at the end.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
topology="${TOPOLOGY:-all}"
nofile="${NOFILE:-20000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"

echo "edge_scale.sh: cargo build --release (parley, edge_scale)" >&2
cargo build --release --locked -p parley -p parley-bench --bin parley --bin edge_scale >&2

# Every process inherits this: the cap of the benchmark is 20,000 open files per process.
hard="$(ulimit -Hn)"
if [[ "$hard" != unlimited && "$hard" -lt "$nofile" ]]; then
  echo "edge_scale.sh: the hard open-files limit is $hard, below $nofile; raise it (limits.conf, or run as root)" >&2
  exit 1
fi
ulimit -n "$nofile"   # soft and hard: no process can raise it past the cap

eval "$(scripts/services.sh start)"
trap 'scripts/services.sh stop >/dev/null 2>&1 || true' EXIT

echo "edge_scale.sh: topology=$topology, open files per process $(ulimit -Sn), load average $(cat /proc/loadavg)" >&2
"$CARGO_TARGET_DIR/release/edge_scale" run \
  --parley "$CARGO_TARGET_DIR/release/parley" \
  --database-url "$PARLEY_TEST_DATABASE_URL" \
  --nats-url "$PARLEY_TEST_NATS_URL" \
  --edge-nats-url "nats://$PARLEY_TEST_NATS_EDGE_USER:$PARLEY_TEST_NATS_EDGE_PASSWORD@${PARLEY_TEST_NATS_PLAIN_URL#nats://}" \
  --topology "$topology" \
  --db-pid "$(head -n 1 "$PARLEY_SERVICES_DIR/pg/data/postmaster.pid")" \
  --nats-pid "$(cat "$PARLEY_SERVICES_DIR/nats.pid")" \
  "$@"
