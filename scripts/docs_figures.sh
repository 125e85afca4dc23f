#!/usr/bin/env bash
# Rebuild the sampling and editing figures of docs/sampling_editing.md from two checkpoints:
#   bash scripts/docs_figures.sh CT_CKPT CD_CKPT [CLASSIFIER_CKPT]
# (a checkpoint, a slim export or zoo:NAME; '-' skips that model and keeps its figures)
# Each picture is written by the suite's own command lines (cmexp.sample, cmexp.edit,
# cmexp.tau_search) into logs/, then copied to docs/img/. Runs in a few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
CT=$1; CD=$2; CLF=${3:-}
PY=${PYTHON:-.venv/bin/python}
OUT=logs/docs_figures/$(date +%Y-%m-%d_%H-%M-%S)
mkdir -p docs/img "$OUT"
for pair in "ct:$CT" "cd:$CD"; do
  name=${pair%%:*}; ckpt=${pair#*:}
  [ "$ckpt" = "-" ] && continue
  for steps in 1 2 4; do
    $PY -m cmexp.sample ckpt="$ckpt" num_samples=64 steps=$steps hydra.run.dir="$OUT/${name}_sample_${steps}step"
    cp "$OUT/${name}_sample_${steps}step/samples_grid.png" "docs/img/fmnist_${name}_sample_${steps}step.png"
  done
  for task in inpaint superres denoise stroke interpolate; do
    $PY -m cmexp.edit task=$task ckpt="$ckpt" num_samples=8 hydra.run.dir="$OUT/${name}_edit_${task}"
    cp "$OUT/${name}_edit_${task}/edit_${task}.png" "docs/img/fmnist_${name}_edit_${task}.png"
    cp "$OUT/${name}_edit_${task}/metrics.json" "docs/img/fmnist_${name}_edit_${task}.json"
  done
  $PY -m cmexp.edit task=inpaint task.mask=boxes ckpt="$ckpt" num_samples=8 hydra.run.dir="$OUT/${name}_edit_inpaint_boxes"
  cp "$OUT/${name}_edit_inpaint_boxes/edit_inpaint.png" "docs/img/fmnist_${name}_edit_inpaint_boxes.png"
  if [ -n "$CLF" ]; then
    $PY -m cmexp.tau_search ckpt="$ckpt" features.ckpt="$CLF" steps=2 hydra.run.dir="$OUT/${name}_tau_search"
    cp "$OUT/${name}_tau_search/tau_search.json" "docs/img/fmnist_${name}_tau_search.json"
  fi
done
echo "figures in docs/img, runs in $OUT"
