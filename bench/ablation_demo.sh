#!/usr/bin/env bash
# BiDM component ablation on the demo's digits teacher (runs/demo/fp32 must exist: run `make demo` first).
# Each variant is the demo's BiDM student with one switch changed; same budget, data order and x_T.
set -euo pipefail
cd "$(dirname "$0")/.."
BIDM=.venv/bin/bidm
declare -A VARIANTS=(
  [sampler_cache]="--set binarize.train_cache=sampler"
  [no_tbs]="--set binarize.tbs_blocks=0"
  [no_spd]="--set binarize.feature_loss=none"
)
for name in "${!VARIANTS[@]}"; do
  mkdir -p "runs/ablation/$name"
  [ -e "runs/ablation/$name/fp32" ] || cp -r runs/demo/fp32 "runs/ablation/$name/fp32"
  $BIDM demo --out "runs/ablation/$name" --methods bidm ${VARIANTS[$name]} > "runs/ablation/$name.log" 2>&1
done
# paths in a compare file are relative to the file
cat > runs/ablation/compare.yaml <<YAML
runs:
  - {path: ../demo/bidm, label: "BiDM (TBS t+1 cache, SPD)"}
  - {path: sampler_cache/bidm, label: "BiDM, training cache from t+T/steps"}
  - {path: no_tbs/bidm, label: "BiDM without TBS connections"}
  - {path: no_spd/bidm, label: "BiDM without SPD"}
  - {path: ../demo/xnor, label: "XNOR"}
out: table
YAML
$BIDM compare runs/ablation/compare.yaml
cat runs/ablation/table/comparison.md
