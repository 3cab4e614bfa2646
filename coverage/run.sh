#!/usr/bin/env bash
# Line coverage per crate with cargo-llvm-cov, using Debian's LLVM tools of
# the same major version as rustc's LLVM (rustup's llvm-tools component is
# not needed). Prints a table and fails if a crate falls below its floor in
# coverage/crates.toml. Reports go to coverage/report/.
#
#   bash coverage/run.sh            # every configured crate
#   bash coverage/run.sh qapi-gen   # one crate
set -euo pipefail
cd "$(dirname "$0")/.."

llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
if ! command -v "llvm-cov-$llvm_major" >/dev/null; then
    echo "installing llvm-$llvm_major (rustc uses LLVM $llvm_major)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-$llvm_major" >/dev/null
fi
export LLVM_COV="/usr/bin/llvm-cov-$llvm_major" LLVM_PROFDATA="/usr/bin/llvm-profdata-$llvm_major"
command -v cargo-llvm-cov >/dev/null || cargo install -q cargo-llvm-cov

# Coverage builds go to their own target directory so they never invalidate
# the normal build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/coverage}"
mkdir -p coverage/report

crates=("$@")
if [ ${#crates[@]} -eq 0 ]; then
    mapfile -t crates < <(sed -n 's/^\[\(.*\)\]$/\1/p' coverage/crates.toml)
fi

fail=0
printf '%-16s %8s %8s %8s\n' crate lines covered percent
for crate in "${crates[@]}"; do
    floor=$(awk -v c="[$crate]" '$0==c{f=1;next} /^\[/{f=0} f && /^min_lines/{print $3}' coverage/crates.toml)
    ignore=$(awk -v c="[$crate]" '$0==c{f=1;next} /^\[/{f=0} f && /^ignore/{sub(/^ignore *= */,""); print}' coverage/crates.toml \
        | tr -d '[]" ' | tr ',' '|' | sed 's/\\\\/\\/g')
    args=(--package "$crate" --json --summary-only --output-path "coverage/report/$crate.json")
    [ -n "$ignore" ] && args+=(--ignore-filename-regex "$ignore")
    cargo llvm-cov "${args[@]}" >/dev/null 2>"coverage/report/$crate.log" || {
        echo "$crate: cargo llvm-cov failed, see coverage/report/$crate.log"; fail=1; continue; }
    # Count only this crate's own files.
    read -r total covered < <(python3 - "$crate" <<'PY'
import json, sys, os
crate = sys.argv[1]
data = json.load(open(f"coverage/report/{crate}.json"))
root = os.getcwd()
total = covered = 0
for f in data["data"][0]["files"]:
    name = os.path.relpath(f["filename"], root)
    if name.startswith((f"crates/{crate}/", f"{crate}/")):
        total += f["summary"]["lines"]["count"]
        covered += f["summary"]["lines"]["covered"]
print(total, covered)
PY
)
    pct=$(awk -v t="$total" -v c="$covered" 'BEGIN{ if (t>0) printf "%.1f", 100*c/t; else print "0.0" }')
    printf '%-16s %8s %8s %7s%%\n' "$crate" "$total" "$covered" "$pct"
    if [ -n "$floor" ] && awk -v p="$pct" -v f="$floor" 'BEGIN{exit !(p < f)}'; then
        echo "  below its floor of $floor%"; fail=1
    fi
done
exit $fail
