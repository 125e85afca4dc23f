"""Compare runs from their local logs, no server needed:
``python -m cmexp.compare RUN_DIR_OR_SWEEP_DIR... [--metric val/fd_fmnist_1step] [--out DIR]``.

Each run folder is read from its CSV log (``csv/metrics.csv``) or, without one, from its W&B
offline run through ``wandb leet inspect --json``. Writes ``compare.md`` and ``compare.csv``
(final value of every metric, one row per run, labelled by the Hydra overrides that differ
between the runs, or by ``--label`` config keys) and ``compare.png`` (each ``--metric`` against
images seen in its own panel, one line per run, as in Fig. 3). Runs of several sweeps can be
compared together, e.g. Fig. 3(b) from an Euler sweep and a Heun sweep:
``python -m cmexp.compare sweeps/euler sweeps/heun --label solver,schedule.num_scales``.
"""

from __future__ import annotations

import argparse
import bisect
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
        """``(x, y)`` of ``key`` against ``x_key``, or against steps when ``x_key`` is not logged.

        An evaluation logged at step s (after s optimizer steps) takes ``x_key`` from the last
        training row at or before s (Lightning logs the row of step s's batch as s - 1).
        """
        xs = sorted(self.series.get(x_key, []))
        steps = [s for s, _ in xs]
        out_x, out_y = [], []
        for s, v in self.series.get(key, []):
            if xs:
                i = bisect.bisect_right(steps, s) - 1
                out_x.append(xs[max(i, 0)][1])
            else:
                out_x.append(float(s))
            out_y.append(v)
        return out_x, out_y


def _label(run_dir: Path) -> str:
    over = run_dir / ".hydra" / "overrides.yaml"
    if over.is_file():
        items = yaml.safe_load(over.read_text()) or []
        keep = [
            o
            for o in items
            if not o.startswith(("hydra.", "paths.", "+experiment=", "model.teacher_path="))
        ]
        if keep:
            return ",".join(keep)
    choices = run_dir / "choices.yaml"
    if choices.is_file():
        exp = (yaml.safe_load(choices.read_text()) or {}).get("experiment")
        if exp:
            return str(exp)
    return run_dir.name


def config_value(run_dir: Path, key: str) -> str | None:
    """``key`` of a run: its config-group choice (``choices.yaml``, e.g. ``metric`` -> ``l2``)
    or the dotted path in ``config_resolved.yaml`` (e.g. ``schedule.num_scales`` -> ``18``)."""
    choices = run_dir / "choices.yaml"
    if choices.is_file():
        value = (yaml.safe_load(choices.read_text()) or {}).get(key)
        if value is not None:
            return str(value)
    resolved = run_dir / "config_resolved.yaml"
    if resolved.is_file():
        node: object = yaml.safe_load(resolved.read_text())
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return str(node)
    return None


def _add(series: dict[str, list[tuple[int, float]]], step: int, key: str, value: object) -> None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    if math.isfinite(v):
        series.setdefault(key, []).append((step, v))


def read_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` of a Lightning ``metrics.csv``; a ValueError naming
    the file when it is not a readable UTF-8 CSV log."""
    series: dict[str, list[tuple[int, float]]] = {}
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            for line, row in enumerate(csv.DictReader(fh), start=2):
                try:
                    step = int(float(row.get("step") or 0))
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{path}: line {line} has step={row.get('step')!r}; expected a number"
                    ) from None
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in (None, ""):
                        _add(series, step, key, value)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not a UTF-8 CSV file (byte {err.object[err.start]:#04x} at offset {err.start})"
        ) from None
    except csv.Error as err:
        raise ValueError(f"{path} is not a readable CSV file ({err})") from None
    return series


def read_wandb_offline(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """History records of the W&B offline run under ``run_dir`` (``wandb leet inspect --json``)."""
    offline = (
        sorted((run_dir / "wandb").glob("offline-run-*")) if (run_dir / "wandb").is_dir() else []
    )
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


def find_runs(paths: list[str], label_keys: list[str] | None = None) -> list[Run]:
    """Run folders among ``paths`` (a run folder, or any folder above run folders).

    Runs are labelled by ``label_keys`` (``key=value`` from each run's config, see
    :func:`config_value`) or, without them, by the Hydra overrides that differ between runs.
    """
    runs: list[Run] = []
    for p in paths:
        root = Path(p).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"{p}: no such run or sweep folder")
        candidates = (
            [root]
            if (root / "config_resolved.yaml").is_file()
            else sorted(d.parent for d in root.rglob("config_resolved.yaml"))
        )
        for d in candidates:
            series = (
                read_csv(d / "csv" / "metrics.csv")
                if (d / "csv" / "metrics.csv").is_file()
                else read_wandb_offline(d)
            )
            if series:
                runs.append(Run(d, _label(d), series))
    if not runs:
        raise FileNotFoundError(
            f"no runs with logs (csv/metrics.csv or wandb/offline-run-*) under {', '.join(paths)}"
        )
    if label_keys:
        for r in runs:
            values = {k: config_value(r.path, k) for k in label_keys}
            missing = [k for k, v in values.items() if v is None]
            if missing:
                raise KeyError(
                    f"--label {','.join(missing)}: not a config group or key of the run {r.path}"
                )
            r.label = ",".join(f"{k}={v}" for k, v in values.items())
        return runs
    # label runs by what differs between them (a sweep's parameters), not by shared overrides
    parts = [r.label.split(",") for r in runs]
    common = set.intersection(*(set(p) for p in parts)) if len(runs) > 1 else set()
    for r, p in zip(runs, parts):
        own = [x for x in p if x not in common]
        r.label = ",".join(own) if own else r.label
    return runs


def table(runs: list[Run], keys: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    keys = keys or sorted(
        {
            k
            for r in runs
            for k in r.series
            if k.startswith(("val/", "train/loss", "train/kimg", "test/"))
        }
    )
    header = ["run", *keys]
    rows = [
        [r.label, *("" if r.final(k) is None else f"{r.final(k):.4g}" for k in keys)] for r in runs
    ]
    return header, rows


def compare(
    paths: list[str],
    out: str | Path,
    metric: str | list[str] | None = None,
    label_keys: list[str] | None = None,
    title: str | None = None,
) -> dict[str, Path]:
    """Write compare.md, compare.csv and compare.png for the runs under ``paths``.

    Args:
        metric: metric(s) to plot, one panel each (default: the first ``val/*1step`` metric,
            else ``train/loss``). label_keys: config keys that label the runs.
    """
    out = Path(out).expanduser()
    check_out_folder(out)
    runs = find_runs(paths, label_keys)
    if metric is None:
        fd = sorted({k for r in runs for k in r.series if k.startswith("val/") and "1step" in k})
        metric = fd[0] if fd else "train/loss"
    metrics = [metric] if isinstance(metric, str) else list(metric)
    unknown = [m for m in metrics if not any(m in r.series for r in runs)]
    if unknown:
        raise KeyError(
            f"--metric {','.join(unknown)}: not logged by any run (logged: {', '.join(sorted({k for r in runs for k in r.series}))})"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    header, rows = table(runs)
    with open(out / "compare.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(5.5 * len(metrics), 4), dpi=120, squeeze=False
    )
    for ax, m in zip(axes[0], metrics):
        for r in runs:
            x, y = r.curve(m)
            if x:
                ax.plot(x, y, label=r.label, marker="o" if len(x) < 20 else None)
        ax.set_xlabel(
            "images seen (kimg)" if any("train/kimg" in r.series for r in runs) else "step"
        )
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "compare.png")
    plt.close(fig)
    return {"md": out / "compare.md", "csv": out / "compare.csv", "png": out / "compare.png"}


def check_out_folder(out: Path) -> None:
    """``--out`` is a new folder or one that holds only earlier comparisons, never a file or
    another command's run folder."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(
            f"--out {out} is a file; expected a folder for compare.md, compare.csv and compare.png"
        )
    if out.is_dir() and any(
        (out / name).exists() for name in (".hydra", "config_resolved.yaml", "checkpoints")
    ):
        raise FileExistsError(
            f"--out {out} is a run folder; refusing to write into it: use another folder"
        )


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end with one ``error: ...`` line and exit code 2, like the other commands."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see python -m cmexp.compare --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    ap = _Parser(prog="python -m cmexp.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="run folders or sweep (multirun) folders")
    ap.add_argument(
        "--metric",
        default=None,
        help="metric(s) to plot, comma-separated, one panel each (default: the first val/*1step, else train/loss)",
    )
    ap.add_argument(
        "--label",
        default=None,
        help="config keys that label the runs, comma-separated (group choices such as metric, solver, "
        "schedule, or dotted keys such as schedule.num_scales); default: the differing overrides",
    )
    ap.add_argument("--title", default=None, help="figure title")
    ap.add_argument("--out", default="compare", help="output folder (default ./compare)")
    args = ap.parse_args(argv)
    try:
        files = compare(
            args.paths,
            args.out,
            args.metric.split(",") if args.metric else None,
            args.label.split(",") if args.label else None,
            args.title,
        )
    except (
        FileNotFoundError,
        FileExistsError,
        RuntimeError,
        KeyError,
        ValueError,
        yaml.YAMLError,
    ) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        sys.exit(2)
    print((files["md"]).read_text())
    print(f"wrote {files['md']}, {files['csv']}, {files['png']}")


if __name__ == "__main__":
    main()
