"""Cost of the in-training sample-quality callback as a fraction of training wall time.

Builds the main job's CT model (and optionally the EDM teacher) from the real configs, times
``--steps`` optimizer steps and one evaluation of ``SampleQualityCallback`` at its default
settings (1000 samples at 1 and 2 steps, real features cached), all in this one process, and
reports ``eval / (every_n_steps * step + eval)``. Appends the figures to BENCHMARKS.md.

    .venv/bin/python benchmarks/eval_callback_cost.py --classifier <run>/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]


def build(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/cmexp_bench"
        cfg.paths.root_dir = str(ROOT)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--classifier", required=True, help="last.ckpt of +experiment=fmnist_classifier"
    )
    ap.add_argument("--experiment", default="fmnist_ct_pseudo_huber")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--write", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    import lightning.pytorch as pl

    cfg = build(
        [
            f"+experiment={args.experiment}",
            "quality=fmnist",
            f"callbacks.sample_quality.features.ckpt={args.classifier}",
        ]
    )
    dm = instantiate(cfg.dataset)
    model = instantiate(cfg.model)
    cb = instantiate(cfg.callbacks.sample_quality)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[],
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    step = (
        time.perf_counter() - t0
    ) / args.steps  # includes the first step's warm-up: an upper bound
    cb._real(trainer, model.device)  # the real features are computed once per key and cached
    t0 = time.perf_counter()
    metrics = cb.evaluate(trainer, model)
    evaluation = time.perf_counter() - t0
    k = cb.every_n_steps
    frac = evaluation / (k * step + evaluation)
    line = (
        f"| {datetime.date.today()} | {args.experiment} | {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads | {step:.3f} s | {evaluation:.1f} s ({cb.num_samples} samples x "
        f"{len([m for m in metrics if m.startswith('val/fd_')])} sets) | {k} | **{100 * frac:.2f}%** |"
    )
    print(line)
    out = Path(args.write)
    if args.write:
        text = out.read_text() if out.exists() else ""
        head = "| date | experiment | CPU | train step | one evaluation | cadence (steps) | eval share of wall time |\n|---|---|---|---|---|---|---|\n"
        if "## Sample-quality callback cost" not in text:
            text += "\n## Sample-quality callback cost (issue 4; target <= 3%)\n\n" + head
        out.write_text(text.rstrip("\n") + "\n" + line + "\n")


if __name__ == "__main__":
    main()
