"""Training modes side by side on Fashion-MNIST at equal images seen (docs/modes.md).

    .venv/bin/python scripts/modes_fmnist.py TEACHER_CKPT [--out OUT] [--steps 1000] [--every 250]
    .venv/bin/python scripts/modes_fmnist.py --table OUT        # (re)write OUT/modes.{md,csv,png}
    .venv/bin/python scripts/modes_fmnist.py --grids OUT        # (re)write OUT/modes_grid.png

1. trains CD (fmnist_cd_l2), ECT (fmnist_ect) and sCD (fmnist_scd) from TEACHER_CKPT, and
   iCT-style CT (fmnist_ct_pseudo_huber) and sCT (fmnist_sct) from scratch, all with
   ``+sweep=modes`` (batch 64, ``--steps`` steps, fd_fmnist of 1- and 2-step samples every
   ``--every`` steps with the shipped classifier, the same seeds everywhere);
2. writes OUT/modes.csv (every evaluation), OUT/modes.md (the last evaluation per mode) and
   OUT/modes.png (fd_fmnist against images seen, 1 and 2 steps);
3. writes OUT/modes_grid.png: each mode's last checkpoint (sampling EMA), 1 and 2 steps (its
   default tau), the same seeds 0..N-1 in every row.
DRY_RUN=1 prints the training commands instead of running them.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DISTILLED = ("fmnist_cd_l2", "fmnist_ect", "fmnist_scd")
FROM_SCRATCH = ("fmnist_ct_pseudo_huber", "fmnist_sct")


def train(out: Path, teacher: str, steps: int, every: int) -> None:
    common = [
        "+sweep=modes",
        f"trainer.max_steps={steps}",
        f"callbacks.sample_quality.every_n_steps={every}",
    ]
    # "++": Hydra first composes a multirun's sweep config without the swept +experiment (the
    # default model has no teacher_path), where a plain override is refused as a new key.
    groups = [
        (DISTILLED, [f"++model.teacher_path={teacher}"], "distilled"),
        (FROM_SCRATCH, [], "scratch"),
    ]
    for experiments, extra, name in groups:
        cmd = [
            sys.executable,
            "-m",
            "cmexp.train",
            "-m",
            f"+experiment={','.join(experiments)}",
            *common,
            *extra,
            f"hydra.sweep.dir={out / 'runs' / name}",
        ]
        if os.environ.get("DRY_RUN") == "1":
            print(" ".join(cmd))
            continue
        subprocess.run(cmd, cwd=ROOT, check=True)


def run_mode(run: Path) -> str:
    """The experiment a multirun job folder trained (from its .hydra/overrides.yaml)."""
    overrides = run / ".hydra" / "overrides.yaml"
    text = overrides.read_text() if overrides.is_file() else ""
    return next((e for e in (*DISTILLED, *FROM_SCRATCH) if f"experiment={e}" in text), run.name)


def collect(out: Path) -> list[dict]:
    rows = []
    for metrics in sorted((out / "runs").glob("*/*/csv/metrics.csv")):
        mode = run_mode(metrics.parents[1])
        kimg_at: dict[int, float] = {}
        evals: dict[int, dict] = {}
        with open(metrics) as fh:
            for r in csv.DictReader(fh):
                step = int(r["step"])
                if r.get("train/kimg"):
                    kimg_at[step] = float(r["train/kimg"])
                for k in ("val/fd_fmnist_1step", "val/fd_fmnist_2step"):
                    if r.get(k):
                        evals.setdefault(step, {})[k.split("_")[-1]] = float(r[k])
        for step, v in sorted(evals.items()):
            kimg = kimg_at.get(step, kimg_at.get(step - 1, (step + 1) * 64 / 1000))
            rows.append(
                {
                    "mode": mode,
                    "step": step,
                    "kimg": kimg,
                    "fd_1step": v.get("1step"),
                    "fd_2step": v.get("2step"),
                }
            )
    return rows


def table(out: Path) -> None:
    rows = collect(out)
    if not rows:
        raise SystemExit(f"no evaluations under {out / 'runs'}: train first")
    with open(out / "modes.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    last = {}
    for r in rows:
        last[r["mode"]] = r
    lines = [
        "| mode | images seen (kimg) | fd_fmnist 1 step | fd_fmnist 2 steps |",
        "|---|---|---|---|",
    ]
    for mode, r in last.items():
        f1 = f"{r['fd_1step']:.2f}" if r["fd_1step"] is not None else "-"
        f2 = f"{r['fd_2step']:.2f}" if r["fd_2step"] is not None else "-"
        lines.append(f"| {mode} | {r['kimg']:.1f} | {f1} | {f2} |")
    (out / "modes.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in zip(axes, ("fd_1step", "fd_2step"), ("1 step", "2 steps"), strict=True):
        for mode in last:
            pts = [(r["kimg"], r[key]) for r in rows if r["mode"] == mode and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=mode)
        ax.set_title(title)
        ax.set_xlabel("images seen (kimg)")
        ax.set_yscale("log")
    axes[0].set_ylabel("fd_fmnist (lower is better)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "modes.png", dpi=100)
    print((out / "modes.md").read_text())


def grids(out: Path, num: int = 12) -> None:
    """One row per mode and step count: ``num`` samples of each run's last checkpoint, image i
    from seed i in every row (1 step: f(T z, T); 2 steps: the checkpoint's default tau)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from cmexp.inference import generate, load_model, sigma_plan

    runs = [
        (run_mode(c.parents[1]), c)
        for c in sorted((out / "runs").glob("*/*/checkpoints/last.ckpt"))
    ]
    if not runs:
        raise SystemExit(f"no checkpoints under {out / 'runs'}: train first")
    rows = []
    with torch.no_grad():
        for mode, ckpt in runs:
            loaded = load_model(str(ckpt))
            for steps in (1, 2):
                x = generate(loaded, num, sigma_plan(loaded.spec, steps), seed=0)
                strip = torch.cat(list(((x[:, 0] + 1) / 2).clamp(0, 1)), dim=1)
                rows.append((f"{mode}, {steps} step{'s' * (steps > 1)}", strip))
    fig, axes = plt.subplots(len(rows), 1, figsize=(num * 0.6, len(rows) * 0.75))
    for ax, (label, strip) in zip(axes, rows, strict=True):
        ax.imshow(strip.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "modes_grid.png", dpi=100)
    print(f"wrote {out / 'modes_grid.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "teacher", nargs="?", help="last.ckpt of +experiment=fmnist_edm (or zoo:NAME)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "modes")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument(
        "--table", type=Path, default=None, help="only (re)write the table and plot of this folder"
    )
    parser.add_argument(
        "--grids", type=Path, default=None, help="only (re)write the sample grids of this folder"
    )
    args = parser.parse_args()
    if args.table is not None:
        table(args.table)
        return
    if args.grids is not None:
        grids(args.grids)
        return
    if not args.teacher:
        parser.error("TEACHER_CKPT is required (last.ckpt of +experiment=fmnist_edm, or zoo:NAME)")
    train(args.out, args.teacher, args.steps, args.every)
    if os.environ.get("DRY_RUN") != "1":
        table(args.out)
        grids(args.out)


if __name__ == "__main__":
    main()
