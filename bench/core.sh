#!/usr/bin/env bash
# Runs the core's criterion benchmarks and writes the table into bench/RESULTS.md.
# Usage: bench/core.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --locked -p fulcrum-core --bench pick
CPU=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
SECTION=$(mktemp)
{
  echo "<!-- core-bench:start -->"
  echo "Date: $(date -u +%Y-%m-%d), machine: $CPU, $(nproc) cores. Command: \`bench/core.sh\`"
  echo "(criterion, median of 20 samples, 1 s each; pools weighted 1 to 4, a third of the"
  echo "endpoints holding a request in flight; keys and clients vary from pick to pick)."
  echo
  python3 bench/core_table.py target/criterion
  echo "<!-- core-bench:end -->"
} > "$SECTION"
python3 - bench/RESULTS.md "$SECTION" <<'PY'
import re, sys
path, section = sys.argv[1], open(sys.argv[2]).read().strip()
text = open(path).read()
text = re.sub(r"<!-- core-bench:start -->.*?<!-- core-bench:end -->", lambda _: section, text, flags=re.S)
open(path, "w").write(text)
PY
rm -f "$SECTION"
echo "== updated bench/RESULTS.md"
