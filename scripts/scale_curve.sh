#!/usr/bin/env bash
# The scale curve (issue 11): personalized, local and aggregated against the number of federated
# users (40, 200, 1,000) at fixed pairs per user and fixed ε_user (the same q, z and rounds).
# Runs simulations/configs/scale-{40,200,1000}.toml into results/scale-N/ (a run whose
# results.json already exists is reused; REDO=1 reruns it), then `fedpref-sim curve` writes
# results/scale-curve/scale_curve.{json,png}. Not part of `make demo`: about an hour on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
dirs=()
for n in ${SIZES:-40 200 1000}; do
  out=results/scale-$n
  if [[ ! -f $out/results.json || ${REDO:-0} == 1 ]]; then
    "$BIN/fedpref-sim" run --config "simulations/configs/scale-$n.toml" --out "$out"
  fi
  dirs+=("$out")
done
"$BIN/fedpref-sim" curve "${dirs[@]}" --out results/scale-curve
