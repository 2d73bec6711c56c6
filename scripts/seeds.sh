#!/usr/bin/env bash
# Mean ± sd over seeds (issue 11): one config run with --seed 0, 1, 2 (SEEDS to change), each into
# OUT-seedS/, then `fedpref-sim seeds` writes OUT-seeds/seeds.json and prints every target's verdict.
#   scripts/seeds.sh simulations/configs/demo.toml results/demo
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
config=${1:?usage: scripts/seeds.sh CONFIG.toml OUT_PREFIX}
prefix=${2:?usage: scripts/seeds.sh CONFIG.toml OUT_PREFIX}
dirs=()
for s in ${SEEDS:-0 1 2}; do
  out=$prefix-seed$s
  if [[ ! -f $out/results.json || ${REDO:-0} == 1 ]]; then
    "$BIN/fedpref-sim" run --config "$config" --seed "$s" --out "$out"
  fi
  dirs+=("$out")
done
"$BIN/fedpref-sim" seeds "${dirs[@]}" --out "$prefix-seeds"
