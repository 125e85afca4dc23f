#!/usr/bin/env bash
# The reduced Fashion-MNIST reproduction of CM paper Fig. 4: CD against progressive distillation
# (PD) from the same EDM teacher, plus the teacher's own few-step samplers.
#   bash scripts/fig4_fmnist.sh TEACHER_CKPT [OUT_DIR]
#   bash scripts/fig4_fmnist.sh --table OUT_DIR        # (re)write OUT_DIR/fig4.{md,csv,png}
# TEACHER_CKPT: last.ckpt of `python -m cmexp.train +experiment=fmnist_edm` (use a strong one:
# both students inherit its quality). fd_fmnist needs the feature classifier
# (CLASSIFIER, default zoo:fmnist_classifier, the shipped one; or a +experiment=fmnist_classifier checkpoint).
# 1. trains CD (+experiment=fmnist_cd_l2) and PD (+experiment=fmnist_pd: 64 teacher DDIM steps
#    halved in 6 rounds) with +sweep=fig4 metric=l2, both STEPS optimizer steps at batch 64
#    (equal images seen; LPIPS arms: metric=l2,lpips with the VGG16 weights in $TORCH_HOME);
# 2. scores fd_fmnist with cmexp.eval (NUM_SAMPLES images, the same seeds everywhere, against the
#    10,000 Fashion-MNIST test images as docs/results.md): CD at
#    NFE 1, 2, 4; PD's students of rounds 3-6 (NFE 8, 4, 2, 1); the teacher with DDIM, Euler and
#    Heun on the same Karras levels as the PD students (solver_steps; Heun: NFE 2, 4, 8; DDIM
#    with eta = 0 and Euler are the same sampler in sigma, the Euler row checks it);
# 3. writes OUT_DIR/fig4.md, fig4.csv and fig4.png (fd_fmnist against NFE).
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUN=$PY
[ "${DRY_RUN:-0}" = "1" ] && RUN="echo $PY"

table() {
  $PY - "$1" <<'PYEOF'
import csv, json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []
for metrics in sorted((out / "eval").glob("*/metrics.json")):
    data = json.loads(metrics.read_text())
    method = metrics.parent.name.split("_round")[0]
    for name, m in data["metrics"].items():
        s = data["protocol"]["sets"][name]
        rows.append({"method": method, "sampler": s["sampler"], "nfe": s["nfe"], "fd_fmnist": m["fd_fmnist"],
                     "kid_fmnist": m.get("kid_fmnist"), "ckpt": data["protocol"]["ckpt"]})
rows.sort(key=lambda r: (r["method"], r["nfe"]))
with open(out / "fig4.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
nfes = sorted({r["nfe"] for r in rows})
methods = sorted({r["method"] for r in rows})
cell = {(r["method"], r["nfe"]): r["fd_fmnist"] for r in rows}
lines = ["| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
for mth in methods:
    lines.append(f"| {mth} | " + " | ".join(f"{cell[(mth, n)]:.2f}" if (mth, n) in cell else "-" for n in nfes) + " |")
(out / "fig4.md").write_text("fd_fmnist (lower is better)\n\n" + "\n".join(lines) + "\n")
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(5, 3.5))
for mth in methods:
    pts = sorted((n, v) for (m, n), v in cell.items() if m == mth)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mth)
ax.set_xscale("log", base=2)
ax.set_xlabel("NFE")
ax.set_ylabel("fd_fmnist")
ax.set_title("Fig. 4, Fashion-MNIST: CD vs PD (same teacher)")
ax.legend()
fig.tight_layout()
fig.savefig(out / "fig4.png", dpi=120)
print("\n".join(lines))
PYEOF
}

if [ "${1:-}" = "--table" ]; then table "$2"; exit 0; fi
TEACHER=${1:?usage: bash scripts/fig4_fmnist.sh TEACHER_CKPT [OUT_DIR]}
OUT=${2:-logs/fig4_fmnist/$(date +%Y-%m-%d_%H-%M-%S)}
CLF=${CLASSIFIER:-zoo:fmnist_classifier}
STEPS=${STEPS:-1200}; ROUNDS=6; NUM_SAMPLES=${NUM_SAMPLES:-5000}
[[ "$TEACHER" == zoo:* ]] || [ -f "$TEACHER" ] || { echo "error: teacher checkpoint $TEACHER not found (run +experiment=fmnist_edm first)" >&2; exit 2; }
[[ "$CLF" == zoo:* ]] || [ -f "$CLF" ] || { echo "error: classifier $CLF not found (run +experiment=fmnist_classifier, or set CLASSIFIER)" >&2; exit 2; }
if [ -e "$OUT" ]; then echo "error: $OUT exists; give a new output folder" >&2; exit 2; fi
if (( STEPS % ROUNDS )); then echo "error: STEPS=$STEPS must be a multiple of the $ROUNDS PD rounds" >&2; exit 2; fi
LEN=$((STEPS / ROUNDS))
Q="callbacks.sample_quality.features.ckpt=$CLF trainer.enable_progress_bar=false"

# 1. the two students, same teacher, same images seen (STEPS x batch 64)
$RUN -m cmexp.train +experiment=fmnist_cd_l2 +sweep=fig4 metric=l2 "model.teacher_path=$TEACHER" \
  trainer.max_steps=$STEPS $Q "hydra.sweep.dir=$OUT/cd"
$RUN -m cmexp.train +experiment=fmnist_pd +sweep=fig4 metric=l2 "model.teacher_path=$TEACHER" \
  trainer.max_steps=$STEPS model.steps_per_round=$LEN $Q "hydra.sweep.dir=$OUT/pd"

# 2. fd_fmnist at equal NFE (image i uses seed i in every set)
EV="features.ckpt=$CLF num_samples=$NUM_SAMPLES num_real=10000 real_split=test"
$RUN -m cmexp.eval "ckpt=$OUT/cd/0/checkpoints/last.ckpt" 'steps=[1,2,4]' $EV "hydra.run.dir=$OUT/eval/cd"
for r in 3 4 5 6; do  # the students of 8, 4, 2 and 1 steps, checkpointed at their round's end
  $RUN -m cmexp.eval "ckpt=$OUT/pd/0/checkpoints/step$(printf %07d $((r * LEN))).ckpt" $EV "hydra.run.dir=$OUT/eval/pd_round$r"
done
$RUN -m cmexp.eval "ckpt=$TEACHER" sampler=ddim 'solver_steps=[1,2,4,8]' $EV "hydra.run.dir=$OUT/eval/teacher_ddim"
$RUN -m cmexp.eval "ckpt=$TEACHER" sampler=euler 'solver_steps=[1,2,4,8]' $EV "hydra.run.dir=$OUT/eval/teacher_euler"
$RUN -m cmexp.eval "ckpt=$TEACHER" sampler=heun 'solver_steps=[1,2,4]' $EV "hydra.run.dir=$OUT/eval/teacher_heun"

# 3. the table and the plot
if [ "${DRY_RUN:-0}" = "1" ]; then echo "table $OUT"; else table "$OUT"; fi
echo "runs, scores and fig4.{md,csv,png} in $OUT"
