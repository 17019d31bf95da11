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
cat > runs/ablation/compare.yaml <<YAML
runs:
  - {path: runs/demo/bidm, label: "BiDM (TBS t+1 cache, SPD)"}
  - {path: runs/ablation/sampler_cache/bidm, label: "BiDM, training cache from t+T/steps"}
  - {path: runs/ablation/no_tbs/bidm, label: "BiDM without TBS connections"}
  - {path: runs/ablation/no_spd/bidm, label: "BiDM without SPD"}
  - {path: runs/demo/xnor, label: "XNOR"}
out: runs/ablation/table
YAML
$BIDM compare runs/ablation/compare.yaml
cat runs/ablation/table/comparison.md
