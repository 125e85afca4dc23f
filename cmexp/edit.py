"""Zero-shot editing entry point: ``python -m cmexp.edit task=NAME ckpt=PATH``.

Reads real images (the checkpoint's dataset, or ``images_dir``; :mod:`cmexp.inference.data`),
runs the task of ``conf/task/<NAME>.yaml`` (CM paper Alg. 4; :mod:`cmexp.inference.tasks`)
with per-image seeds and writes a grid (before / input / result / ground truth) and
``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from cmexp.utils.checks import check_config
from cmexp.utils.cli import precheck, run_cli

log = logging.getLogger("cmexp.edit")


def edit(cfg: DictConfig) -> dict[str, Any]:
    """Run one editing task on real images; write the grid and metrics to the run folder."""
    check_config("edit", cfg)
    import torch
    from hydra.utils import instantiate

    from cmexp import registry
    from cmexp.diffusion.sampling import SeededNoise
    from cmexp.inference.request import prepare
    from cmexp.inference.data import real_images
    from cmexp.inference.tasks import EditContext, check_latent_task

    req = prepare(
        cfg,
        kinds=registry.kinds("consistency"),
        purpose="editing needs a consistency model",
    )
    loaded, device = req.loaded, req.device
    task = instantiate(cfg.task)
    name = task_choice(cfg)
    if loaded.latent is not None:
        check_latent_task(task, name, str(cfg.ckpt))
    images = real_images(
        loaded.dataset,
        int(cfg.num_samples),
        str(cfg.real_split),
        loaded.img_resolution,
        loaded.img_channels,
        cfg.images_dir,
        cfg.data_dir,
    ).to(device)
    ctx = EditContext(
        f=loaded.model,
        images=images,
        spec=loaded.spec,
        seed=int(cfg.seed),
        noise=SeededNoise(range(int(cfg.seed), int(cfg.seed) + len(images)), device),
        latent=loaded.latent,
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        result = task(ctx)
    seconds = time.perf_counter() - t0
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = _write_grid(result.rows, out_dir / f"edit_{name}.png")
    metrics = _metrics(cfg, name, loaded.kind, len(images), result, seconds, grid)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    log.info("%s: %s", name, {k: metrics[k] for k in ("psnr", "ssim", "lpips") if k in metrics})
    print(f"wrote {grid} and {out_dir / 'metrics.json'}")
    return {"metrics": metrics, "rows": result.rows}


def _metrics(
    cfg: DictConfig, name: str, kind: str, num: int, result: Any, seconds: float, grid: Path
) -> dict[str, Any]:
    """What ``metrics.json`` records; restoration tasks add PSNR, SSIM and LPIPS against the
    ground truth."""
    from cmexp.inference.data import restoration_metrics

    metrics: dict[str, Any] = {
        "task": name,
        "ckpt": str(cfg.ckpt),
        "kind": kind,
        "num_samples": num,
        "seed": int(cfg.seed),
        "rows": list(result.rows),
        "settings": result.info,
        "seconds": round(seconds, 3),
        "grid": str(grid),
    }
    if result.restoration:
        metrics.update(
            restoration_metrics(
                result.rows["result"].cpu(),
                result.rows["ground_truth"].cpu(),
                cfg.metric.weights_path,
            )
        )
    return metrics


def _write_grid(rows: dict[str, Any], path: Path) -> Path:
    """One grid row per named row of an edit (shorter rows padded white)."""
    import torch

    from cmexp.utils.images import image_grid, save_png

    cpu = [r.cpu() for r in rows.values()]
    width = max(len(r) for r in cpu)
    padded = [
        torch.cat([r, torch.ones(width - len(r), *r.shape[1:])]) if len(r) < width else r
        for r in cpu
    ]
    return save_png(image_grid(torch.cat(padded), nrow=width), path, scale=2)


def task_choice(cfg: DictConfig) -> str:
    """The selected ``task`` option (e.g. "inpaint"), or the task class name outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("task")
        if choice:
            return str(choice)
    return str(cfg.task._target_).rsplit(".", 1)[-1].lower()


@hydra.main(version_base="1.3", config_path="../conf", config_name="edit")
def main(cfg: DictConfig) -> None:
    """Run :func:`edit`; bad input ends with one ``error: ...`` line (exit code 2)."""
    run_cli(edit, cfg)


if __name__ == "__main__":
    run_cli(precheck, "edit")  # bad input: one line, exit 2, before Hydra makes the run folder
    main()
