"""Greedy tau search entry point: ``python -m cmexp.tau_search ckpt=PATH features.ckpt=...``.

Each candidate schedule of grid indices ``(0, j_1, ..., j_k)`` is scored by the Frechet
distance between ``num_samples`` images sampled with those taus (fixed seeds) and
``num_real`` real images, in the feature space of ``conf/features/`` (torchmetrics).
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

log = logging.getLogger("cmexp.tau_search")


def tau_search(cfg: DictConfig) -> dict[str, Any]:
    """Run the search; write ``tau_search.json`` to the run folder and return its content."""
    import torch
    from hydra.utils import instantiate

    from cmexp.diffusion.karras import karras_sigmas
    from cmexp.diffusion.tau_search import greedy_tau_search
    from cmexp.edit import load_images
    from cmexp.metrics import frechet_distance_metric
    from cmexp.utils.checkpoint import load_consistency_model
    from cmexp.utils.generate import generate

    if int(cfg.steps) < 2:
        raise ValueError(f"steps must be >= 2 (there is no tau to search for 1 step), got {cfg.steps}")
    loaded, device = load_consistency_model(cfg, "the tau search")
    features = instantiate(cfg.features).to(device)
    metric = frechet_distance_metric(features).to(device)
    name = f"fd_{getattr(features, 'name', 'features')}"

    real = load_images(loaded, int(cfg.num_real), str(cfg.real_split), data_dir=cfg.data_dir)
    for i in range(0, len(real), int(cfg.batch_size)):
        metric.update(((real[i : i + int(cfg.batch_size)] + 1) / 2).to(device), real=True)
    m = loaded.model
    grid = karras_sigmas(int(cfg.grid_num_scales), m.sigma_min, m.sigma_max, float(cfg.rho), dtype=torch.float64)

    def score(indices: tuple[int, ...]) -> float:
        sigmas = [float(grid[j]) for j in indices]
        images = generate(loaded, int(cfg.num_samples), sigmas, int(cfg.seed), int(cfg.batch_size), device=device)
        metric.reset()
        for i in range(0, len(images), int(cfg.batch_size)):
            metric.update(((images[i : i + int(cfg.batch_size)] + 1) / 2).to(device), real=False)
        value = float(metric.compute())
        log.info("indices %s taus %s: %s = %.4f", indices[1:], [round(s, 4) for s in sigmas[1:]], name, value)
        return value

    t0 = time.perf_counter()
    indices, evaluated = greedy_tau_search(score, int(cfg.grid_num_scales), int(cfg.steps) - 1)
    taus = [float(grid[j]) for j in indices]
    result = {
        "ckpt": str(cfg.ckpt), "metric": name, "features": getattr(features, "source", ""),
        "steps": int(cfg.steps), "grid_num_scales": int(cfg.grid_num_scales),
        "tau_indices": indices, "taus": taus, "score": evaluated[(0, *indices)],
        "evaluated": [{"tau_indices": list(k[1:]), "taus": [float(grid[j]) for j in k[1:]], name: v}
                      for k, v in sorted(evaluated.items())],
        "num_samples": int(cfg.num_samples), "num_real": len(real), "real_split": str(cfg.real_split),
        "seeds": [int(cfg.seed), int(cfg.seed) + int(cfg.num_samples) - 1],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tau_search.json").write_text(json.dumps(result, indent=2))
    print(f"chosen tau_indices={indices} taus={[round(t, 4) for t in taus]} ({name} = {result['score']:.4f}); "
          f"use: python -m cmexp.sample ckpt={cfg.ckpt} steps={cfg.steps} taus=[{','.join(f'{t:.4f}' for t in taus)}]")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="tau_search")
def main(cfg: DictConfig) -> None:
    """Run :func:`tau_search`; bad input ends with one ``error: ...`` line (exit code 2)."""
    run_cli(tau_search, cfg)


if __name__ == "__main__":
    main()
