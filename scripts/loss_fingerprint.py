"""The first K training losses of a set of experiments, for checking that a refactor changes
no numerics (issue: "a method is one folder"): run it before and after, compare the JSON files.

    python scripts/loss_fingerprint.py --out before.json            # writes the losses
    python scripts/loss_fingerprint.py --out after.json --compare before.json   # exit 1 on any change

Each experiment runs as its own ``python -m cmexp.train +experiment=NAME`` with ``--threads``
CPU threads (the float sums depend on the thread count: compare runs with the same count) and its
unchanged recipe (teacher ``zoo:fmnist_edm`` where it needs one), stopped after K optimizer steps by the
:class:`StopAfter` callback below, and its ``train/loss`` column is read from ``csv/metrics.csv``.
Equality is bit for bit (the float repr of each logged loss).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parents[1]

#: experiment -> extra overrides (the teacher where the experiment leaves it to the command line)
EXPERIMENTS: dict[str, list[str]] = {
    "fmnist_cd_quick": [],  # the main job (python -m cmexp.train)
    "fmnist_ct_pseudo_huber": [],
    "fmnist_ect": ["model.teacher_path=zoo:fmnist_edm"],
    "fmnist_sct": [],
    "fmnist_pd": ["model.teacher_path=zoo:fmnist_edm"],
}


class StopAfter(pl.Callback):
    """Stop a training after ``steps`` optimizer steps without changing its recipe."""

    def __init__(self, steps: int) -> None:
        self.steps = int(steps)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def losses(
    experiment: str, extra: list[str], steps: int, workdir: Path, threads: int
) -> list[str]:
    """The ``train/loss`` column of the first ``steps`` steps, as logged (strings)."""
    out = workdir / experiment
    cmd = [
        sys.executable,
        "-m",
        "cmexp.train",
        f"+experiment={experiment}",
        *extra,
        f"hydra.run.dir={out}",
        "+callbacks.stop_after._target_=loss_fingerprint.StopAfter",
        f"+callbacks.stop_after.steps={steps}",
        "callbacks.checkpoint=null",
        "logger=csv",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'scripts'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    vals = [r["train/loss"] for r in rows if r.get("train/loss")]
    return vals[:steps]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write {experiment: [losses]}")
    p.add_argument("--compare", help="an earlier JSON: exit 1 unless every loss is identical")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--only", nargs="*", help="a subset of the experiments")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each run (default 2)")
    a = p.parse_args()
    names = a.only or list(EXPERIMENTS)
    result: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            result[name] = losses(name, EXPERIMENTS[name], a.steps, Path(tmp), a.threads)
            print(
                f"{name}: {len(result[name])} losses, first {result[name][0]}, last {result[name][-1]}"
            )
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    if a.compare:
        before = json.loads(Path(a.compare).read_text())
        bad = [n for n in names if before.get(n) != result[n]]
        for n in bad:
            print(f"CHANGED: {n}\n  before {before.get(n)}\n  after  {result[n]}")
        print("identical" if not bad else f"{len(bad)} of {len(names)} experiments changed")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
