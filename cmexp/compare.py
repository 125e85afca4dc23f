"""Compare runs from their local logs, no server needed:
``python -m cmexp.compare RUN_DIR_OR_SWEEP_DIR... [--metric val/fd_fmnist_1step] [--out DIR]``.

Each run folder is read from its CSV log (``csv/metrics.csv``) or, without one, from its W&B
offline run through ``wandb leet inspect --json``. Writes ``compare.md`` and ``compare.csv``
(final value of every metric, one row per run, labelled by its Hydra overrides) and
``compare.png`` (the chosen metric against images seen, one line per run, as in Fig. 3).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class Run:
    """One run's label and its logged series ``{metric: [(step, value), ...]}``."""

    path: Path
    label: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def final(self, key: str) -> float | None:
        values = self.series.get(key)
        return values[-1][1] if values else None

    def curve(self, key: str, x_key: str = "train/kimg") -> tuple[list[float], list[float]]:
        """``(x, y)`` of ``key`` against ``x_key`` (matched by step), or against steps."""
        xs = dict(self.series.get(x_key, []))
        pts = [(xs.get(s, float(s)) if xs else float(s), v) for s, v in self.series.get(key, [])]
        return [p[0] for p in pts], [p[1] for p in pts]


def _label(run_dir: Path) -> str:
    over = run_dir / ".hydra" / "overrides.yaml"
    if over.is_file():
        items = yaml.safe_load(over.read_text()) or []
        keep = [o for o in items if not o.startswith(("hydra.", "paths.", "+experiment=", "model.teacher_path="))]
        if keep:
            return ",".join(keep)
    choices = run_dir / "choices.yaml"
    if choices.is_file():
        exp = (yaml.safe_load(choices.read_text()) or {}).get("experiment")
        if exp:
            return str(exp)
    return run_dir.name


def _add(series: dict[str, list[tuple[int, float]]], step: int, key: str, value: object) -> None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    if math.isfinite(v):
        series.setdefault(key, []).append((step, v))


def read_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in (None, ""):
                    _add(series, step, key, value)
    return series


def read_wandb_offline(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """History records of the W&B offline run under ``run_dir`` (``wandb leet inspect --json``)."""
    offline = sorted((run_dir / "wandb").glob("offline-run-*")) if (run_dir / "wandb").is_dir() else []
    if not offline:
        return {}
    exe = Path(sys.executable).with_name("wandb")
    cmd = [str(exe) if exe.is_file() else "wandb", "leet", "inspect", "--json", str(offline[-1])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip().splitlines()[-1:]}")
    series: dict[str, list[tuple[int, float]]] = {}
    for line in out.stdout.splitlines():
        if '"history"' not in line:
            continue
        item = json.loads(line).get("history", {}).get("item", {})
        step = int(item.get("trainer/global_step", item.get("_step", 0)))
        for key, value in item.items():
            if not key.startswith("_") and key not in ("trainer/global_step", "epoch"):
                _add(series, step, key, value)
    return series


def find_runs(paths: list[str]) -> list[Run]:
    """Run folders among ``paths`` (a run folder, or any folder above run folders)."""
    runs: list[Run] = []
    for p in paths:
        root = Path(p).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"{p}: no such run or sweep folder")
        candidates = [root] if (root / "config_resolved.yaml").is_file() else sorted(
            d.parent for d in root.rglob("config_resolved.yaml"))
        for d in candidates:
            series = read_csv(d / "csv" / "metrics.csv") if (d / "csv" / "metrics.csv").is_file() else read_wandb_offline(d)
            if series:
                runs.append(Run(d, _label(d), series))
    if not runs:
        raise FileNotFoundError(f"no runs with logs (csv/metrics.csv or wandb/offline-run-*) under {', '.join(paths)}")
    # label runs by what differs between them (a sweep's parameters), not by shared overrides
    parts = [r.label.split(",") for r in runs]
    common = set.intersection(*(set(p) for p in parts)) if len(runs) > 1 else set()
    for r, p in zip(runs, parts):
        own = [x for x in p if x not in common]
        r.label = ",".join(own) if own else r.label
    return runs


def table(runs: list[Run], keys: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    keys = keys or sorted({k for r in runs for k in r.series if k.startswith(("val/", "train/loss", "train/kimg", "test/"))})
    header = ["run", *keys]
    rows = [[r.label, *("" if r.final(k) is None else f"{r.final(k):.4g}" for k in keys)] for r in runs]
    return header, rows


def compare(paths: list[str], out: str | Path, metric: str | None = None) -> dict[str, Path]:
    """Write compare.md, compare.csv and compare.png for the runs under ``paths``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = find_runs(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table(runs)
    with open(out / "compare.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    if metric is None:
        fd = sorted({k for r in runs for k in r.series if k.startswith("val/") and "1step" in k})
        metric = fd[0] if fd else "train/loss"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in runs:
        x, y = r.curve(metric)
        if x:
            ax.plot(x, y, label=r.label, marker="o" if len(x) < 20 else None)
    ax.set_xlabel("images seen (kimg)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "compare.png")
    plt.close(fig)
    return {"md": out / "compare.md", "csv": out / "compare.csv", "png": out / "compare.png"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cmexp.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="run folders or sweep (multirun) folders")
    ap.add_argument("--metric", default=None, help="metric to plot (default: the first val/*1step, else train/loss)")
    ap.add_argument("--out", default="compare", help="output folder (default ./compare)")
    args = ap.parse_args(argv)
    try:
        files = compare(args.paths, args.out, args.metric)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print((files["md"]).read_text())
    print(f"wrote {files['md']}, {files['csv']}, {files['png']}")


if __name__ == "__main__":
    main()
