#!/bin/sh
# Instructions per request (valgrind's callgrind Ir) of the graph path against the qcow2
# crate alone: 4 KiB sequential requests at depth 1 from the page cache (/dev/shm), the
# cost of the request path without the noise of wall-clock timing on a shared machine.
# Each path runs 2000 and 12000 requests; the difference divided by 10000 is the cost of
# one request (setup and teardown cancel out).
# Usage: crates/block-graph/benches/callgrind.sh [BENCH_BINARY]
# (default: build the io bench and use it).
set -eu
BIN="${1:-}"
if [ -z "$BIN" ]; then
    cd "$(dirname "$0")/../../.."
    BIN=$(cargo bench -q -p block-graph --bench io --no-run 2>&1 |
        sed -n 's/.*Executable .*(\(.*\))/\1/p' | tail -1)
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
ir() {
    valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.%p" "$BIN" --one "$1" "$2" \
        --count "$3" 2>&1 >/dev/null | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
for op in read write; do
    g=$(( ($(ir graph $op 12000) - $(ir graph $op 2000)) / 10000 ))
    c=$(( ($(ir crate $op 12000) - $(ir crate $op 2000)) / 10000 ))
    echo "4k seq QD1 $op: graph $g Ir/request, qcow2 crate $c Ir/request, graph/crate $(echo "scale=2; $g / $c" | bc)"
done
