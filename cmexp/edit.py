"""Zero-shot editing entry point: ``python -m cmexp.edit task=NAME ckpt=PATH``.

Reads real images (the checkpoint's dataset, or ``images_dir``), runs the task of
``conf/task/<NAME>.yaml`` (CM paper Alg. 4) with per-image seeds and writes a grid
(before / input / result / ground truth) and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from cmexp.utils.cli import run_cli

log = logging.getLogger("cmexp.edit")


def load_images(loaded: Any, num: int, split: str, images_dir: str | None = None, data_dir: str | None = None) -> Any:
    """``[num, C, H, W]`` real images in [-1, 1] at the model's size: from ``images_dir``, else
    from the checkpoint's dataset (``data_dir`` overrides its folder)."""
    from hydra.utils import instantiate

    from cmexp.data import ImageFolderDataModule

    m = loaded.model
    if images_dir:
        dm = ImageFolderDataModule(data_dir=images_dir, resolution=m.img_resolution,
                                   channels=m.img_channels, num_classes=0)
        split = "train"
    else:
        dcfg = dict(loaded.config.get("dataset") or {})
        if not dcfg:
            raise ValueError(f"ckpt={loaded.path} records no dataset; pass images_dir=/path/to/images")
        dcfg["subset"] = None
        if data_dir:
            dcfg["data_dir"] = str(data_dir)
        dm = instantiate(dcfg)
    return dm.real_images(int(num), str(split))


def restoration_metrics(result: Any, truth: Any, lpips_weights_path: str | None) -> dict[str, Any]:
    """PSNR (dB) and SSIM on [0, 1] images (torchmetrics), LPIPS (VGG) where weights exist."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = (result.clamp(-1, 1) + 1) / 2, (truth.clamp(-1, 1) + 1) / 2
    out: dict[str, Any] = {
        "psnr": float(peak_signal_noise_ratio(a, b, data_range=1.0)),
        "ssim": float(structural_similarity_index_measure(a, b, data_range=1.0)),
    }
    try:
        from cmexp.losses.metrics import LPIPSDistance

        lp = LPIPSDistance("vgg", lpips_weights_path, resize=None)
        out["lpips"] = float(lp(result.clamp(-1, 1), truth).mean())
    except (FileNotFoundError, RuntimeError, ValueError, OSError) as err:
        out["lpips"] = None
        out["lpips_skipped"] = str(err).splitlines()[0]
    return out


def edit(cfg: DictConfig) -> dict[str, Any]:
    """Run one editing task on real images; write the grid and metrics to the run folder."""
    import torch
    from hydra.utils import instantiate

    from cmexp.edit_tasks import EditContext
    from cmexp.diffusion.sampling import SeededNoise
    from cmexp.utils.checkpoint import load_consistency_model
    from cmexp.utils.images import image_grid, save_png

    if int(cfg.num_images) < 1:
        raise ValueError(f"num_images must be >= 1, got {cfg.num_images}")
    loaded, device = load_consistency_model(cfg, "editing")
    task = instantiate(cfg.task)
    name = task_choice(cfg)
    images = load_images(loaded, int(cfg.num_images), str(cfg.split), cfg.images_dir, cfg.data_dir).to(device)
    m = loaded.model
    ctx = EditContext(f=m, images=images, noise=SeededNoise(range(int(cfg.seed), int(cfg.seed) + len(images)), device),
                      sigma_min=m.sigma_min, sigma_max=m.sigma_max, seed=int(cfg.seed), rho=float(cfg.rho))
    t0 = time.perf_counter()
    with torch.no_grad():
        result = task(ctx)
    seconds = time.perf_counter() - t0
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r.cpu() for r in result.rows.values()]
    width = max(len(r) for r in rows)
    padded = [torch.cat([r, torch.ones(width - len(r), *r.shape[1:])]) if len(r) < width else r for r in rows]
    grid = save_png(image_grid(torch.cat(padded), nrow=width), out_dir / f"edit_{name}.png", scale=2)
    metrics: dict[str, Any] = {
        "task": name, "ckpt": str(cfg.ckpt), "kind": loaded.kind, "num_images": len(images),
        "seed": int(cfg.seed), "rows": list(result.rows), "settings": result.info,
        "seconds": round(seconds, 3), "grid": str(grid),
    }
    if result.restoration:
        metrics.update(restoration_metrics(result.rows["result"].cpu(), result.rows["ground_truth"].cpu(),
                                           cfg.lpips_weights_path))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    log.info("%s: %s", name, {k: metrics[k] for k in ("psnr", "ssim", "lpips") if k in metrics})
    print(f"wrote {grid} and {out_dir / 'metrics.json'}")
    return {"metrics": metrics, "rows": result.rows}


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
    main()
