#!/bin/sh
# Speed check of the simulator: 1M requests over 64 backends, one policy, release build, one
# core. Prints the run's table, then the wall time and peak RSS from /usr/bin/time -v.
# Usage: bench/sim/speed.sh [POLICY]   (from the repository root)
set -eu
policy="${1:-least_connections}"
cargo build --release -p fulcrum
/usr/bin/time -v taskset -c 0 target/release/fulcrum simulate \
  --fleet bench/sim/speed-fleet.toml --workload bench/sim/speed-workload.toml \
  --policy "$policy" 2>&1 | grep -E "^(scenario|policy|$policy)|Elapsed|Maximum resident"
