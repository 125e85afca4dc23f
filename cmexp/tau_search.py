"""Greedy tau search entry point: ``python -m cmexp.tau_search ckpt=PATH features.ckpt=...``.

Each candidate schedule of grid indices ``(0, j_1, ..., j_k)`` is scored by the Frechet
distance between ``num_samples`` images sampled with those taus (fixed seeds) and
``num_real`` real images, in the feature space of ``conf/features/`` (the metrics suite's
Frechet distance and real-feature cache, as ``cmexp.eval``). The grid is the checkpoint's
(its ``num_scales`` and ``rho``; override with ``num_scales=``/``rho=``).
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

log = logging.getLogger("cmexp.tau_search")


def tau_search(cfg: DictConfig) -> dict[str, Any]:
    """Run the search; write ``tau_search.json`` to the run folder and return its content."""
    check_config("tau_search", cfg)
    from hydra.utils import instantiate

    from cmexp import registry
    from cmexp.diffusion.tau_search import greedy_tau_search
    from cmexp.inference import sigma_plan
    from cmexp.inference.data import reference_datamodule
    from cmexp.inference.request import prepare
    from cmexp.metrics.features import check_features_fit
    from cmexp.metrics.suite import RealFeatureCache, extract, frechet_distance, reference_features

    req = prepare(
        cfg,
        kinds=registry.kinds("consistency"),
        purpose="the tau search needs a consistency model",
    )
    loaded, device = req.loaded, req.device
    features = instantiate(cfg.features).to(device)
    name = f"fd_{features.name}" if getattr(features, "name", "") else "fid"  # Inception: fid
    check_features_fit(
        features, loaded.img_channels, loaded.img_resolution, f"the samples of ckpt={cfg.ckpt}"
    )
    dm = reference_datamodule(loaded.dataset, cfg.data_dir)
    real = reference_features(
        RealFeatureCache(cfg.cache_dir),
        features,
        dm,
        str(cfg.real_split),
        int(cfg.num_real),
        int(cfg.batch_size),
        device,
    )
    spec = loaded.spec

    def score(indices: tuple[int, ...]) -> float:
        sigmas = sigma_plan(spec, len(indices), tau_indices=indices[1:])
        images = req.generate(
            sigmas, int(cfg.num_samples), int(cfg.seed), int(cfg.batch_size), progress=False
        )
        value = frechet_distance(real, extract(features, images, int(cfg.batch_size), device))
        log.info(
            "indices %s taus %s: %s = %.4f",
            indices[1:],
            [round(s, 4) for s in sigmas[1:]],
            name,
            value,
        )
        return value

    t0 = time.perf_counter()
    indices, evaluated = greedy_tau_search(score, spec.num_scales, int(cfg.steps) - 1)
    result = _result(cfg, name, features, spec, indices, evaluated, len(real["features"]))
    result["clip_denoised"] = req.clip_denoised
    result["seconds"] = round(time.perf_counter() - t0, 2)
    taus = result["taus"]
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tau_search.json").write_text(json.dumps(result, indent=2))
    print(
        f"chosen tau_indices={indices} taus={[round(t, 4) for t in taus]} ({name} = {result['score']:.4f}); "
        f"use: python -m cmexp.sample ckpt={cfg.ckpt} steps={cfg.steps} taus=[{','.join(f'{t:.4f}' for t in taus)}]"
    )
    return result


def _result(
    cfg: DictConfig,
    name: str,
    features: Any,
    spec: Any,
    indices: list[int],
    evaluated: dict[tuple[int, ...], float],
    num_real: int,
) -> dict[str, Any]:
    """What ``tau_search.json`` records: the chosen levels, every evaluated set, the protocol."""
    grid = spec.grid()
    return {
        "ckpt": str(cfg.ckpt),
        "metric": name,
        "features": getattr(features, "source", ""),
        "steps": int(cfg.steps),
        "num_scales": spec.num_scales,
        "rho": spec.rho,
        "tau_indices": indices,
        "taus": [float(grid[j]) for j in indices],
        "score": evaluated[(0, *indices)],
        "evaluated": [
            {"tau_indices": list(k[1:]), "taus": [float(grid[j]) for j in k[1:]], name: v}
            for k, v in sorted(evaluated.items())
        ],
        "num_samples": int(cfg.num_samples),
        "num_real": num_real,
        "real_split": str(cfg.real_split),
        "seeds": [int(cfg.seed), int(cfg.seed) + int(cfg.num_samples) - 1],
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="tau_search")
def main(cfg: DictConfig) -> None:
    """Run :func:`tau_search`; bad input ends with one ``error: ...`` line (exit code 2)."""
    run_cli(tau_search, cfg)


if __name__ == "__main__":
    run_cli(
        precheck, "tau_search"
    )  # bad input: one line, exit 2, before Hydra makes the run folder
    main()
