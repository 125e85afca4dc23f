"""Sampling entry point: ``python -m cmexp.sample ckpt=PATH num_samples=... steps=1``.

Consistency models sample in one step or with explicit taus (CM paper Alg. 1,
``steps=2 taus=[0.585]`` or ``tau_indices=[11]``); diffusion models (EDM teachers, PD
students, VP teachers) with ``sampler=heun|euler|ddim|ddpm|edm_sde`` (default: the
checkpoint's own) on their own plan or ``solver_steps=k``.
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
from cmexp.utils.cli import list_or_none, precheck, run_cli

log = logging.getLogger("cmexp.sample")


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Generate ``cfg.num_samples`` images and write them to ``cfg.paths.output_dir``."""
    check_config("sample", cfg)
    from cmexp.inference import (
        check_sampler,
        generate,
        load_from_config,
        nfe,
        sampler_options,
        save_samples,
        sigma_plan,
        solver_plan,
    )
    from cmexp.inference.conditional import (
        check_class_labels,
        check_guidance,
        conditioned_model,
        sample_labels,
    )

    loaded, device = load_from_config(cfg)
    class_labels = check_class_labels(
        loaded, list_or_none(cfg.get("class_labels"), "class_labels")
    )
    guidance = check_guidance(loaded, cfg.get("guidance"))
    passes = conditioned_model(loaded, guidance)[1]
    sampler = check_sampler(cfg.get("sampler"), loaded.spec)  # null: the model's own
    options = sampler_options(sampler, cfg)
    if loaded.spec.uses_solver:
        steps = cfg.get("solver_steps")
        sigmas = sigma_plan(loaded.spec) if steps is None else solver_plan(loaded.spec, steps)
    else:
        sigmas = sigma_plan(
            loaded.spec,
            int(cfg.steps),
            list_or_none(cfg.taus, "taus"),
            list_or_none(cfg.tau_indices, "tau_indices"),
        )
    t0 = time.perf_counter()
    images = generate(
        loaded,
        int(cfg.num_samples),
        sigmas,
        int(cfg.seed),
        int(cfg.batch_size),
        sampler,
        device,
        progress=True,
        options=options,
        class_labels=class_labels,
        guidance=guidance,
    )
    seconds = time.perf_counter() - t0
    out_dir = Path(cfg.paths.output_dir)
    seeds = range(int(cfg.seed), int(cfg.seed) + int(cfg.num_samples))
    labels = sample_labels(loaded, seeds, class_labels)
    files = save_samples(images, out_dir, int(cfg.grid_size), labels=labels)
    info = {
        "ckpt": str(cfg.ckpt),
        "kind": loaded.kind,
        "weights": "ema" if cfg.use_ema else "online",
        "sampler": sampler,
        "options": options,
        "sigmas": [float(s) for s in sigmas],
        "nfe": nfe(sigmas, sampler, passes),
        **(
            {
                "class_labels": labels.tolist(),
                "guidance": guidance,
                "label_source": "class_labels" if class_labels else "seed",
            }
            if labels is not None
            else {}
        ),
        "rho": loaded.spec.rho,
        "num_scales": loaded.spec.num_scales,
        "num_samples": int(cfg.num_samples),
        "seeds": [int(cfg.seed), int(cfg.seed) + int(cfg.num_samples) - 1],
        "seconds": round(seconds, 3),
        "images_per_second": round(int(cfg.num_samples) / max(seconds, 1e-9), 2),
        "device": device,
        "files": files,
    }
    (out_dir / "sample.json").write_text(json.dumps(info, indent=2))
    log.info(
        "%d images (%s, NFE %d) in %.1f s -> %s",
        cfg.num_samples,
        sampler,
        info["nfe"],
        seconds,
        out_dir,
    )
    print(f"wrote {files['npz']} and {files['grid']}")
    return {"images": images, "info": info}


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    """Run :func:`sample`; bad input ends with one ``error: ...`` line (exit code 2)."""
    run_cli(sample, cfg)


if __name__ == "__main__":
    run_cli(precheck, "sample")  # bad input: one line, exit 2, before Hydra makes the run folder
    main()
