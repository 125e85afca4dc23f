"""docs/results.md's table, learning curves and sample grids, from `cmexp.eval` folders, training
runs and checkpoints (nothing is typed in by hand).

    .venv/bin/python scripts/results_fmnist.py table OUT LABEL=EVAL_DIR [LABEL=EVAL_DIR ...]
    .venv/bin/python scripts/results_fmnist.py curves OUT LABEL=SOURCE [LABEL=SOURCE ...]
    .venv/bin/python scripts/results_fmnist.py grids OUT LABEL=CKPT:STEPS[:TAU...] [...] [--num 12]

table   OUT/results_table.{md,csv}: one row per sample set of each EVAL_DIR/metrics.json
        (fd_fmnist, KID, IS, precision, recall, NFE, the noise levels, samples, reference).
curves  OUT/results_curves.{png,csv}: fd_fmnist against images seen. SOURCE is a run folder
        (its csv/metrics.csv: every val/fd_fmnist_<set> the quality callback logged, one line
        per set) or a CSV file with columns kimg,fd[,set] (e.g. evaluations of saved steps).
grids   OUT/results_grid.png: one row per LABEL, sample i from seed i in every row (the same
        noise for every model). CKPT is a checkpoint, a slim export or zoo:NAME; STEPS is the
        number of consistency steps, or heun for a diffusion model's own Heun plan (EDM: N = 18
        levels, NFE 35); TAU: the intermediate noise level(s) (default: the checkpoint's).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def _pairs(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        label, sep, value = item.partition("=")
        if not sep or not label or not value:
            raise SystemExit(f"expected LABEL=VALUE, got {item!r}")
        out.append((label, value))
    return out


def _levels(sigmas: list[float], sampler: str) -> str:
    """The noise levels of a sample set: all of them for a few-step plan, else a summary."""
    if len(sigmas) <= 4:
        return " ".join(f"{x:.4g}" for x in sigmas)
    levels = [x for x in sigmas if x > 0]
    return f"{sampler} on {len(levels)} levels {levels[0]:.4g} ... {levels[-1]:.4g}"


def table(out: Path, items: list[str]) -> list[dict]:
    rows = []
    for label, folder in _pairs(items):
        path = Path(folder) / "metrics.json"
        if not path.is_file():
            raise SystemExit(
                f"{label}={folder}: no metrics.json there (run cmexp.eval with hydra.run.dir={folder})"
            )
        record = json.loads(path.read_text())
        protocol = record["protocol"]
        for name, m in record["metrics"].items():
            s = protocol.get("sets", {}).get(name, {})
            rows.append(
                {
                    "model": label,
                    "set": name,
                    "nfe": s.get("nfe"),
                    "sigmas": _levels(s.get("sigmas", []), s.get("sampler", "")),
                    "fd_fmnist": m["fd_fmnist"],
                    "kid_fmnist": m["kid_fmnist"],
                    "is_fmnist": m.get("is_fmnist"),
                    "precision": m["precision"],
                    "recall": m["recall"],
                    "num_samples": protocol.get("num_samples"),
                    "reference": f"{protocol['reference']['count']} {protocol['reference']['split']}",
                }
            )
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results_table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "| model | sample set | NFE | noise levels | fd_fmnist | KID | IS | precision | recall | samples | reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        is_ = f"{r['is_fmnist']:.2f}" if r["is_fmnist"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['set']} | {r['nfe'] or '-'} | {r['sigmas'] or '-'} | {r['fd_fmnist']:.4g} | "
            f"{r['kid_fmnist']:.3f} | {is_} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{r['num_samples']} | {r['reference']} |"
        )
    (out / "results_table.md").write_text("\n".join(lines) + "\n")
    print((out / "results_table.md").read_text())
    return rows


def _curve_points(source: Path) -> dict[str, list[tuple[float, float]]]:
    """``{set: [(kimg, fd), ...]}`` of a run folder's csv/metrics.csv or of a kimg,fd[,set] CSV."""
    csv_path = source / "csv" / "metrics.csv" if source.is_dir() else source
    if not csv_path.is_file():
        raise SystemExit(f"{source}: neither a run folder with csv/metrics.csv nor a CSV file")
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    points: dict[str, list[tuple[float, float]]] = {}
    if rows and "fd" in rows[0]:  # kimg,fd[,set]
        for r in rows:
            points.setdefault(r.get("set") or "", []).append((float(r["kimg"]), float(r["fd"])))
        return points
    kimg_at = {int(r["step"]): float(r["train/kimg"]) for r in rows if r.get("train/kimg")}
    for r in rows:
        for key, value in r.items():
            if key.startswith("val/fd_") and value:
                step = int(r["step"])
                kimg = kimg_at.get(step, kimg_at.get(step - 1))
                if kimg is not None:
                    points.setdefault(key.rsplit("_", 1)[-1], []).append((kimg, float(value)))
    return points


def curves(out: Path, items: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = []
    for label, source in _pairs(items):
        for name, pts in _curve_points(Path(source)).items():
            pts = sorted(pts)
            full = f"{label} {name}".strip()
            ax.plot(*zip(*pts, strict=True), marker="o", label=full)
            rows += [{"model": full, "kimg": k, "fd_fmnist": f} for k, f in pts]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images seen (kimg)")
    ax.set_ylabel("fd_fmnist (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "results_curves.png", dpi=100)
    with open(out / "results_curves.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["model", "kimg", "fd_fmnist"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / 'results_curves.png'}")


def grids(out: Path, items: list[str], num: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from cmexp.inference import generate, load_model, sigma_plan

    rows = []
    with torch.no_grad():
        for label, spec in _pairs(items):
            bits = spec.split(":")
            n = 2 if spec.startswith("zoo:") else 1  # zoo:NAME:STEPS[:TAU] or PATH:STEPS[:TAU]
            ckpt, parts = ":".join(bits[:n]), bits[n:]
            if not parts:
                raise SystemExit(f"{label}={spec}: expected CKPT:STEPS[:TAU]")
            loaded = load_model(ckpt)
            steps = parts[0]
            if steps == "heun":  # a diffusion model's own Heun plan (EDM: N = 18, NFE 35)
                sampler, plan = "heun", sigma_plan(loaded.spec)
            else:
                taus = [float(t) for t in parts[1:]] or None
                sampler, plan = "consistency", sigma_plan(loaded.spec, int(steps), taus)
            x = generate(loaded, num, plan, seed=0, sampler=sampler)
            rows.append((label, torch.cat(list(((x[:, 0] + 1) / 2).clamp(0, 1)), dim=1)))
    fig, axes = plt.subplots(len(rows), 1, figsize=(num * 0.6, len(rows) * 0.75), squeeze=False)
    for ax, (label, strip) in zip(axes[:, 0], rows, strict=True):
        ax.imshow(strip.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "results_grid.png", dpi=100)
    print(f"wrote {out / 'results_grid.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["table", "curves", "grids"])
    parser.add_argument("out", type=Path)
    parser.add_argument("items", nargs="+", metavar="LABEL=VALUE")
    parser.add_argument("--num", type=int, default=12, help="grids: images per row")
    args = parser.parse_args()
    if args.what == "table":
        table(args.out, args.items)
    elif args.what == "curves":
        curves(args.out, args.items)
    else:
        grids(args.out, args.items, args.num)


if __name__ == "__main__":
    main()
