#!/usr/bin/env bash
# Evidence for class-conditional models and classifier-free guidance (docs/conditional_latent.md):
# per-class grids, the guidance-scale sweep of a conditional teacher and of its guided
# consistency student, and the one-step student against the guided teacher.
#   bash scripts/conditional_fmnist.sh TEACHER_CKPT STUDENT_CKPT [OUT_DIR]
#   bash scripts/conditional_fmnist.sh --table OUT_DIR        # (re)write OUT_DIR/cfg.{md,csv,png}
# TEACHER_CKPT: a class-conditional EDM run with label dropout (+experiment=fmnist_edm_cond or
# fmnist_edm_latent_cond); STUDENT_CKPT: its guided CD student (+experiment=fmnist_cd_guided or
# fmnist_lcm). Latent checkpoints carry their autoencoder, so both kinds work unchanged.
# 1. grids, 10 seeds (rows) x the 10 classes (columns), the same seeds and labels everywhere:
#    the teacher (Heun, N = 18) at w = 1 and 3, the student in 1 step at w = 1 and 3 and in 2 steps at w = 3;
# 2. cmexp.eval +sweep=cfg_scale: the teacher at w in WS_TEACHER, the student (1 and 2 steps) at
#    w in WS_STUDENT (its distilled range), NUM_SAMPLES images each (seeds 0..NUM_SAMPLES-1, a label
#    per seed) against the 10,000 test images in the features of CLASSIFIER;
# 3. OUT_DIR/cfg.md, cfg.csv and cfg.png (fd_fmnist, precision/recall, class accuracy against w).
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
for model in ("teacher", "student"):
    for metrics in sorted((out / f"sweep_{model}").glob("*/metrics.json")):
        data = json.loads(metrics.read_text())
        proto = data["protocol"]
        for name, m in data["metrics"].items():
            s = proto["sets"][name]
            label = f"teacher ({s['sampler']})" if model == "teacher" else f"student {name}"
            rows.append({"model": label, "guidance": proto["guidance"], "nfe": s["nfe"],
                         "fd_fmnist": m["fd_fmnist"], "kid_fmnist": m.get("kid_fmnist"),
                         "precision": m.get("precision"), "recall": m.get("recall"),
                         "class_accuracy": m.get("class_accuracy"), "num_samples": proto["num_samples"],
                         "ckpt": proto["ckpt"]})
if not rows:
    sys.exit(f"no metrics.json under {out}/sweep_*/")
rows.sort(key=lambda r: (r["model"], r["guidance"]))
with open(out / "cfg.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
fmt = lambda v: "-" if v is None else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
lines = ["| model | w | NFE | fd_fmnist | kid_fmnist | precision | recall | class accuracy |", "|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['model']} | {r['guidance']:g} | {r['nfe']} | {r['fd_fmnist']:.2f} | {fmt(r['kid_fmnist'])} | "
                 f"{fmt(r['precision'])} | {fmt(r['recall'])} | {fmt(r['class_accuracy'])} |")
(out / "cfg.md").write_text(f"{rows[0]['num_samples']} samples per row (seeds 0..{rows[0]['num_samples'] - 1})\n\n"
                            + "\n".join(lines) + "\n")
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
for model in sorted({r["model"] for r in rows}):
    pts = [r for r in rows if r["model"] == model]
    ws = [r["guidance"] for r in pts]
    axes[0].plot(ws, [r["fd_fmnist"] for r in pts], marker="o", label=model)
    axes[1].plot([r["recall"] for r in pts], [r["precision"] for r in pts], marker="o", label=model)
    for r in pts:
        axes[1].annotate(f"{r['guidance']:g}", (r["recall"], r["precision"]), fontsize=7)
    axes[2].plot(ws, [r["class_accuracy"] for r in pts], marker="o", label=model)
axes[0].set(xlabel="guidance scale w", ylabel="fd_fmnist", yscale="log", title="FD against w")
axes[1].set(xlabel="recall", ylabel="precision", title="precision/recall (labels: w)")
axes[2].set(xlabel="guidance scale w", ylabel="class accuracy", title="classifier agrees with the label")
axes[0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / "cfg.png", dpi=120)
print("\n".join(lines))
PYEOF
}

if [ "${1:-}" = "--table" ]; then table "$2"; exit 0; fi
TEACHER=${1:?usage: bash scripts/conditional_fmnist.sh TEACHER_CKPT STUDENT_CKPT [OUT_DIR]}
STUDENT=${2:?usage: bash scripts/conditional_fmnist.sh TEACHER_CKPT STUDENT_CKPT [OUT_DIR]}
OUT=${3:-logs/conditional_fmnist/$(date +%Y-%m-%d_%H-%M-%S)}
CLF=${CLASSIFIER:-zoo:fmnist_classifier}
NUM_SAMPLES=${NUM_SAMPLES:-1000}
WS_TEACHER=${WS_TEACHER:-0,1,1.5,2,3,4}
WS_STUDENT=${WS_STUDENT:-1,1.5,2,3,4}
for f in "$TEACHER" "$STUDENT"; do
  [[ "$f" == zoo:* ]] || [ -f "$f" ] || { echo "error: checkpoint $f not found" >&2; exit 2; }
done
if [ -e "$OUT" ]; then echo "error: $OUT exists; give a new output folder" >&2; exit 2; fi
CLASSES='class_labels=[0,1,2,3,4,5,6,7,8,9]'
G="num_samples=100 grid_size=100 $CLASSES"

# 1. per-class grids: image i has seed i and class i mod 10 (grid columns = classes)
for w in 1 3; do
  $RUN -m cmexp.sample "ckpt=$TEACHER" $G guidance=$w "hydra.run.dir=$OUT/grids/teacher_w$w"
  $RUN -m cmexp.sample "ckpt=$STUDENT" $G steps=1 guidance=$w "hydra.run.dir=$OUT/grids/student_1step_w$w"
done
$RUN -m cmexp.sample "ckpt=$STUDENT" $G steps=2 guidance=3 "hydra.run.dir=$OUT/grids/student_2step_w3"

# 2. the guidance sweeps (one cmexp.eval job per w; labels one per seed, the same in every job)
EV="features.ckpt=$CLF num_samples=$NUM_SAMPLES num_real=10000 real_split=test"
$RUN -m cmexp.eval "ckpt=$TEACHER" +sweep=cfg_scale "hydra.sweeper.params.guidance='$WS_TEACHER'" $EV \
  "hydra.sweep.dir=$OUT/sweep_teacher"
$RUN -m cmexp.eval "ckpt=$STUDENT" +sweep=cfg_scale 'steps=[1,2]' "hydra.sweeper.params.guidance='$WS_STUDENT'" $EV \
  "hydra.sweep.dir=$OUT/sweep_student"

# 3. the table and the plot
if [ "${DRY_RUN:-0}" = "1" ]; then echo "table $OUT"; else table "$OUT"; fi
echo "grids, scores and cfg.{md,csv,png} in $OUT"
