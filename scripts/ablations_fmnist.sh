#!/usr/bin/env bash
# The reduced Fashion-MNIST reproduction of CM paper Fig. 3 (docs/ablations.md):
#   bash scripts/ablations_fmnist.sh TEACHER_CKPT [OUT_DIR]
# TEACHER_CKPT: last.ckpt of `python -m cmexp.train +experiment=fmnist_edm`, or zoo:fmnist_edm
# (the shipped teacher). The fd_fmnist curves use the shipped classifier (zoo:fmnist_classifier).
# Each panel is one `+sweep=figXX` command; the reductions (steps, N values, the metric) are
# command-line overrides of the sweep's parameters. About 3 hours on 2 CPU cores with zoo:fmnist_edm
# (a 300-step CD run: ~10 min on 2 threads, 15-20 min on one thread next to another run); set
# STEPS_CD / STEPS_CT to change the run lengths. Then the comparison tables and plots:
#   bash scripts/ablations_fmnist.sh --compare OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
plots() {
  local out=$1 m="val/fd_fmnist_1step,val/fd_fmnist_2step"
  $PY -m cmexp.compare "$out/fig3a" "$out/fig3c/2" "$out/fig3a_l1_lr2e-4" --label metric,model.optimizer.lr --metric $m --title "Fig. 3(a), Fashion-MNIST: CD metric (Heun, N=18)" --out "$out/cmp_fig3a"
  $PY -m cmexp.compare "$out/fig3b" "$out/fig3c/0" "$out/fig3c/2" "$out/fig3c/4" "$out/fig3c/5" --label solver,schedule.num_scales --metric $m --title "Fig. 3(b), Fashion-MNIST: CD solver x N (l2)" --out "$out/cmp_fig3b"
  $PY -m cmexp.compare "$out/fig3c" --label schedule.num_scales --metric $m --title "Fig. 3(c), Fashion-MNIST: CD N with Heun (l2)" --out "$out/cmp_fig3c"
  $PY -m cmexp.compare "$out/fig3c/2" "$out/seeds_heun18" --label seed --metric $m --title "Training-seed noise: CD Heun N=18 (l2), seeds 42, 0, 1" --out "$out/cmp_seeds"
  $PY -m cmexp.compare "$out/fig3d" --label schedule --metric $m --title "Fig. 3(d), Fashion-MNIST: CT schedules (pseudo-Huber)" --out "$out/cmp_fig3d"
}
if [ "${1:-}" = "--compare" ]; then plots "$2"; exit 0; fi
TEACHER=$1
OUT=${2:-logs/ablations_fmnist/$(date +%Y-%m-%d_%H-%M-%S)}
[[ "$TEACHER" == zoo:* ]] || [ -f "$TEACHER" ] || { echo "error: teacher checkpoint $TEACHER not found (run +experiment=fmnist_edm first, or use zoo:fmnist_edm)" >&2; exit 2; }
if [ -e "$OUT" ]; then echo "error: $OUT exists; give a new output folder" >&2; exit 2; fi
STEPS_CD=${STEPS_CD:-300}; STEPS_CT=${STEPS_CT:-800}
Q="callbacks.sample_quality.every_n_steps=100 callbacks.sample_quality.num_samples=500 trainer.enable_progress_bar=false"
CD="+experiment=fmnist_cd_l2 model.teacher_path=$TEACHER $Q"
# (a) the metric: l1 here; its l2 arm is fig3c's N = 18 job (the same configuration). LPIPS
#     needs the ImageNet VGG16 weights: with vgg16-397923af.pth in $TORCH_HOME/hub/checkpoints/
#     run 'metric=l1,lpips' instead
$PY -m cmexp.train $CD trainer.max_steps=$STEPS_CD +sweep=fig3a metric=l1 hydra.sweep.dir="$OUT/fig3a"
#     and l1 at the official code's CD-l1 learning rate, 2e-4, over 500 steps
$PY -m cmexp.train $CD trainer.max_steps=500 +sweep=fig3a metric=l1 model.optimizer.lr=2e-4 hydra.sweep.dir="$OUT/fig3a_l1_lr2e-4"
# (c) N with Heun (6 of the paper's 8 values); also the Heun row of (b)
$PY -m cmexp.train $CD trainer.max_steps=$STEPS_CD +sweep=fig3c 'schedule.num_scales=9,12,18,36,50,120' hydra.sweep.dir="$OUT/fig3c"
#     the noise level over training seeds: (c)'s N = 18 arm (seed 42) again with seeds 0 and 1
$PY -m cmexp.train $CD trainer.max_steps=$STEPS_CD +sweep=seeds 'seed=0,1' hydra.sweep.dir="$OUT/seeds_heun18"
# (d) CT: the paper's adaptive N(k)/mu(k) (s1 = 40 for a short run) against fixed (N, mu)
$PY -m cmexp.train +experiment=fmnist_ct_adaptive +sweep=fig3d 'schedule=adaptive_short,fixed_n18,fixed_n50,fixed_n120' \
  trainer.max_steps=$STEPS_CT $Q hydra.sweep.dir="$OUT/fig3d"
# (b) the Euler row (the Heun row is fig3c)
$PY -m cmexp.train $CD trainer.max_steps=$STEPS_CD +sweep=fig3b solver=euler 'schedule.num_scales=9,18,50,120' hydra.sweep.dir="$OUT/fig3b"
plots "$OUT"
echo "runs and comparisons in $OUT"
