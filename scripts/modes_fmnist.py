"""Every training mode on Fashion-MNIST at equal images seen (docs/modes.md, "Comparing the modes").

    .venv/bin/python scripts/modes_fmnist.py [--teacher zoo:fmnist_edm] [--out OUT] [--steps 1200]
                                             [--until S] [--every 200] [--jobs 2] [--modes cd,ect,...]
    .venv/bin/python scripts/modes_fmnist.py --table OUT    # (re)write OUT/modes.{csv,png}
    .venv/bin/python scripts/modes_fmnist.py --final OUT [--at S] [--num-samples 10000]
    .venv/bin/python scripts/modes_fmnist.py --grids OUT [--at S]

Arms (``ARMS``): CD (``fmnist_cd_l2``), ECT (``fmnist_ect``) and sCD (``fmnist_scd``) from the
EDM teacher; iCT-style CT (``fmnist_ct_pseudo_huber``), sCT (``fmnist_sct``), MeanFlow
(``fmnist_meanflow``) and IMM (``fmnist_imm``) from scratch; TCM (``fmnist_tcm``): for each
budget B it trains (``--until B``) one run OUT/runs/tcm_B whose stage 1 is the ECT arm's
checkpoint at B/2 and whose stage 2 trains the other B/2 steps, so its images seen count both
stages.

1. Training: every arm is one ``cmexp.train +experiment=X +sweep=modes`` run in OUT/runs/<arm>
   (batch 64, 1- and 2-step fd_fmnist of 1,000 fixed seeds against 10,000 training images
   every ``--every`` steps, a checkpoint every 100 steps). ``--jobs`` runs go at once, each on
   one thread. ``--until S`` stops every arm at S steps; running the script again resumes each
   arm exactly from its last.ckpt (``ckpt_path=``) up to the next ``--until``. Anything that
   depends on the run length is pinned to ``--steps`` (CT's curriculum ``schedule.total_steps``),
   so stopping and resuming trains the same run as one go.
2. ``--table``: OUT/modes.csv (every in-training evaluation) and OUT/modes.png (fd_fmnist
   against images seen, 1 and 2 steps).
3. ``--final``: ``cmexp.eval`` of each arm's checkpoint at ``--at`` images-seen steps (default
   ``--steps``): ``--num-samples`` samples (seeds 0..N-1) at 1 and 2 steps, the shipped
   classifier, all 10,000 test images; OUT/final.{csv,md}.
4. ``--grids``: OUT/modes_grid.png, each arm's checkpoint at ``--at``, 1 and 2 steps (its
   default plan), image i from seed i in every row.

DRY_RUN=1 prints the training commands instead of running them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64  # +sweep=modes
CKPT_EVERY = 100


@dataclass(frozen=True)
class Arm:
    """One mode of the comparison: its experiment and what it starts from."""

    experiment: str
    teacher: bool = False  # distilled / initialised from the EDM teacher (model.teacher_path)
    stage1: str | None = None  # TCM: the arm whose checkpoint at half the budget is stage 1


ARMS: dict[str, Arm] = {
    "cd": Arm("fmnist_cd_l2", teacher=True),
    "ect": Arm("fmnist_ect", teacher=True),
    "scd": Arm("fmnist_scd", teacher=True),
    "ct": Arm("fmnist_ct_pseudo_huber"),
    "sct": Arm("fmnist_sct"),
    "meanflow": Arm("fmnist_meanflow"),
    "imm": Arm("fmnist_imm"),
    "tcm": Arm("fmnist_tcm", stage1="ect"),
}
DOUBLE_KIMG_ECT = 25.6  # fmnist_ect / fmnist_tcm model.double_kimg


def offset_steps(arm: Arm, budget: int) -> int:
    """Steps of another arm that this arm starts from (TCM: the ECT stage 1, half the budget)."""
    return budget // 2 if arm.stage1 else 0


def run_name(name: str, budget: int) -> str:
    """The run folder of arm ``name`` for a budget: TCM has one run per budget (its stage 1 is
    the ECT arm at half of it: ``tcm_600`` = 300 ECT steps + 300 TCM steps); the other arms
    have one run, evaluated along the way."""
    return f"{name}_{budget}" if ARMS[name].stage1 else name


def ckpt_dir(out: Path, name: str) -> Path:
    return out / "runs" / name / "checkpoints"


def reached(out: Path, name: str) -> int:
    """Steps an arm's run has finished (0 when it has no checkpoint)."""
    done = out / "runs" / name / "reached.json"
    if done.is_file():
        return int(json.loads(done.read_text())["step"])
    steps = [int(p.stem[4:]) for p in ckpt_dir(out, name).glob("step*.ckpt")]
    return max(steps, default=0)


def command(out: Path, name: str, teacher: str, steps: int, until: int, every: int) -> list[str]:
    """The ``cmexp.train`` command that takes arm ``name`` to ``until`` images-seen steps
    (``steps``: the study's whole budget, which CT's curriculum spans)."""
    arm = ARMS[name]
    run = run_name(name, until)
    own_until = until - offset_steps(arm, until)
    cmd = [
        sys.executable,
        "-m",
        "cmexp.train",
        f"+experiment={arm.experiment}",
        "+sweep=modes",
        f"trainer.max_steps={own_until}",
        f"callbacks.sample_quality.every_n_steps={every}",
        f"callbacks.checkpoint.every_n_train_steps={CKPT_EVERY}",
        f"callbacks.sample_grid.every_n_steps={every}",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={out / 'runs'}",
        f"hydra.sweep.subdir={run}",
    ]
    if arm.teacher:
        # "++": the sweep config is composed before +experiment adds teacher_path
        cmd.append(f"++model.teacher_path={teacher}")
    if arm.experiment == "fmnist_ct_pseudo_huber":
        cmd.append(f"schedule.total_steps={steps}")  # the curriculum of the whole budget
    if arm.stage1:
        half = offset_steps(arm, until)
        cmd += [
            f"model.stage1_path={ckpt_dir(out, arm.stage1) / f'step{half:07d}.ckpt'}",
            # stage 2 continues stage 1's stage (TCM README: --resume_tick)
            f"model.start_stage={int(half * BATCH / 1000 // DOUBLE_KIMG_ECT)}",
        ]
    if (ckpt_dir(out, run) / "last.ckpt").is_file():
        cmd.append(f"ckpt_path={ckpt_dir(out, run) / 'last.ckpt'}")
    return cmd


def run_arm(out: Path, name: str, teacher: str, steps: int, until: int, every: int) -> str:
    arm = ARMS[name]
    run = run_name(name, until)
    own_until = until - offset_steps(arm, until)
    if reached(out, run) >= own_until:
        return f"{run}: at step {reached(out, run)} already"
    if arm.stage1 and os.environ.get("DRY_RUN") != "1":
        half = offset_steps(arm, until)
        while not (ckpt_dir(out, arm.stage1) / f"step{half:07d}.ckpt").is_file():
            time.sleep(30)  # the stage-1 arm runs in another job
    cmd = command(out, name, teacher, steps, until, every)
    if os.environ.get("DRY_RUN") == "1":
        print(" ".join(cmd))
        return f"{name}: dry run"
    (out / "runs" / run).mkdir(parents=True, exist_ok=True)
    log = out / "runs" / f"{run}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        return f"{run}: exit {rc}, see {log}"
    (out / "runs" / run / "reached.json").write_text(json.dumps({"step": own_until}))
    return f"{run}: step {own_until} in {time.time() - t0:.0f} s"


def train(args: argparse.Namespace, names: list[str]) -> None:
    until = args.until or args.steps
    # a stage-1 arm runs before the arms that wait for it
    names = sorted(names, key=lambda n: ARMS[n].stage1 is not None)
    if os.environ.get("DRY_RUN") == "1":  # the commands, in order
        for n in names:
            run_arm(args.out, n, args.teacher, args.steps, until, args.every)
        return
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [
            pool.submit(run_arm, args.out, n, args.teacher, args.steps, until, args.every)
            for n in names
        ]
        for f in futures:
            print(f.result(), flush=True)


def arm_meta(out: Path) -> dict[str, int]:
    meta = out / "study.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def runs_of(out: Path) -> list[tuple[str, str, int]]:
    """(arm, run folder, stage-1 steps before it) of every run under OUT/runs, in ARMS order
    (TCM: one run per budget, ``tcm_<budget>``)."""
    found = []
    for name, arm in ARMS.items():
        if arm.stage1 is None:
            if (out / "runs" / name).is_dir():
                found.append((name, name, 0))
            continue
        budgets = sorted(
            int(d.name.rsplit("_", 1)[1])
            for d in (out / "runs").glob(f"{name}_*")
            if d.is_dir() and d.name.rsplit("_", 1)[1].isdigit()
        )
        found += [(name, f"{name}_{b}", offset_steps(arm, b)) for b in budgets]
    return found


def collect(out: Path) -> list[dict]:
    """Every in-training evaluation: mode, own step, images seen (kimg, stage 1 included)."""
    rows = []
    for name, run, before in runs_of(out):
        arm = ARMS[name]
        metrics = out / "runs" / run / "csv" / "metrics.csv"
        if not metrics.is_file():
            continue
        offset = before * BATCH / 1000
        evals: dict[int, dict] = {}
        with open(metrics) as fh:
            for r in csv.DictReader(fh):
                for k in ("val/fd_fmnist_1step", "val/fd_fmnist_2step"):
                    if r.get(k):
                        evals.setdefault(int(r["step"]), {})[k.split("_")[-1]] = float(r[k])
        for step, v in sorted(evals.items()):
            rows.append(
                {
                    "mode": run,
                    "experiment": arm.experiment,
                    "step": step,
                    "kimg": offset + step * BATCH / 1000,  # logged at global_step = steps done
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in zip(axes, ("fd_1step", "fd_2step"), ("1 step", "2 steps"), strict=True):
        for mode in modes:
            pts = [(r["kimg"], r[key]) for r in rows if r["mode"] == mode and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=mode)
        ax.set_title(title)
        ax.set_xlabel("images seen (kimg)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fd_fmnist, 1,000 samples (lower is better)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "modes.png", dpi=100)
    print(f"wrote {out / 'modes.csv'} and {out / 'modes.png'} ({len(rows)} evaluations)")


def checkpoint_at(out: Path, name: str, at: int) -> Path:
    """Arm ``name``'s checkpoint after ``at`` images-seen steps (TCM: its run for that budget,
    stage 1 included)."""
    own = at - offset_steps(ARMS[name], at)
    path = ckpt_dir(out, run_name(name, at)) / f"step{own:07d}.ckpt"
    if own <= 0 or not path.is_file():
        raise SystemExit(
            f"{path}: no checkpoint of arm {name} at step {at}; train to --until {at}"
        )
    return path


def final(out: Path, at: int, num_samples: int, names: list[str]) -> None:
    """cmexp.eval of every arm at ``at`` steps: 1 and 2 steps, the test split."""
    rows = []
    for name in names:
        ckpt = checkpoint_at(out, name, at)
        run = out / "final" / f"{name}_{at}"
        metrics = run / "metrics.json"
        if not metrics.is_file():
            cmd = [
                sys.executable,
                "-m",
                "cmexp.eval",
                f"ckpt={ckpt}",
                f"num_samples={num_samples}",
                "num_real=10000",
                "real_split=test",
                "steps=[1,2]",
                f"hydra.run.dir={run}",
            ]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
        sets = json.loads(metrics.read_text())["metrics"]
        one, two = sets.get("1step", {}), sets.get("2step", {})
        rows.append(
            {
                "mode": name,
                "experiment": ARMS[name].experiment,
                "kimg": at * BATCH / 1000,
                "fd_1step": one.get("fd_fmnist"),
                "fd_2step": two.get("fd_fmnist"),
                "precision_1step": one.get("precision"),
                "recall_1step": one.get("recall"),
                "precision_2step": two.get("precision"),
                "recall_2step": two.get("recall"),
            }
        )
    with open(out / "final.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        "| mode | experiment | fd_fmnist 1 step | fd_fmnist 2 steps | precision / recall 1 step "
        "| precision / recall 2 steps |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | `{r['experiment']}` | {fmt(r['fd_1step'])} | {fmt(r['fd_2step'])} "
            f"| {fmt(r['precision_1step'])} / {fmt(r['recall_1step'])} "
            f"| {fmt(r['precision_2step'])} / {fmt(r['recall_2step'])} |"
        )
    (out / "final.md").write_text("\n".join(lines) + "\n")
    print((out / "final.md").read_text())


def grids(out: Path, at: int | None, num: int = 12) -> None:
    """One row per arm and step count: ``num`` samples of each arm's checkpoint at ``at``
    (default: last.ckpt), image i from seed i in every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from cmexp.inference import generate, load_model, sigma_plan

    runs = []
    for name, run, _ in runs_of(out):
        last = ckpt_dir(out, run) / "last.ckpt"
        if at is not None and run == run_name(name, at):
            runs.append((name, checkpoint_at(out, name, at)))
        elif at is None and last.is_file():
            runs.append((run, last))
    if not runs:
        raise SystemExit(f"no checkpoints under {out / 'runs'}: train first")
    rows = []
    with torch.no_grad():
        for name, ckpt in runs:
            loaded = load_model(str(ckpt))
            for k in (1, 2):
                x = generate(loaded, num, sigma_plan(loaded.spec, k), seed=0)
                strip = torch.cat(list(((x[:, 0] + 1) / 2).clamp(0, 1)), dim=1)
                rows.append((f"{name}, {k} step{'s' * (k > 1)}", strip))
    fig, axes = plt.subplots(len(rows), 1, figsize=(num * 0.6, len(rows) * 0.75), squeeze=False)
    for ax, (label, strip) in zip(axes[:, 0], rows, strict=True):
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
    parser.add_argument("--teacher", default="zoo:fmnist_edm", help="the EDM teacher checkpoint")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "modes")
    parser.add_argument("--steps", type=int, default=1200, help="the budget (steps at batch 64)")
    parser.add_argument("--until", type=int, default=None, help="stop every arm at this step")
    parser.add_argument("--every", type=int, default=200, help="in-training evaluation period")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--modes", default=",".join(ARMS), help=f"a subset of {','.join(ARMS)}")
    parser.add_argument("--table", type=Path, default=None, help="only write the table and plot")
    parser.add_argument("--final", type=Path, default=None, help="only the final evaluation")
    parser.add_argument("--grids", type=Path, default=None, help="only the sample grids")
    parser.add_argument("--at", type=int, default=None, help="--final/--grids: images-seen step")
    parser.add_argument("--num-samples", type=int, default=10000)
    args = parser.parse_args()
    names = [n for n in args.modes.split(",") if n]
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)}; expected some of {', '.join(ARMS)}")
    if args.table is not None:
        table(args.table)
    elif args.final is not None:
        final(args.final, args.at or arm_meta(args.final)["steps"], args.num_samples, names)
    elif args.grids is not None:
        grids(args.grids, args.at)
    else:
        if args.steps % (2 * CKPT_EVERY) or args.steps % args.every:
            parser.error(f"--steps must be a multiple of {2 * CKPT_EVERY} and of --every")
        meta = arm_meta(args.out)
        if meta and meta.get("steps") != args.steps:
            parser.error(f"--steps: {args.out} was trained for --steps {meta['steps']}")
        if os.environ.get("DRY_RUN") != "1":
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "study.json").write_text(json.dumps({"steps": args.steps}))
        train(args, names)


if __name__ == "__main__":
    main()
