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
from cmexp.utils.cli import precheck, run_cli

log = logging.getLogger("cmexp.sample")


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Generate ``cfg.num_samples`` images and write them to ``cfg.paths.output_dir``:
    load (the shared inference preamble), plan, run, write."""
    check_config("sample", cfg)
    from cmexp.inference.generate import save_samples
    from cmexp.inference.request import prepare

    req = prepare(cfg)
    (_, sigmas) = req.plans[0]
    num, seed = int(cfg.num_samples), int(cfg.seed)
    t0 = time.perf_counter()
    images = req.generate(sigmas, num, seed, int(cfg.batch_size))
    seconds = time.perf_counter() - t0
    out_dir = Path(cfg.paths.output_dir)
    labels = req.labels(seed, num)
    files = save_samples(images, out_dir, int(cfg.grid_size), labels=labels)
    info = {
        **req.describe(cfg),
        "sigmas": [float(s) for s in sigmas],
        "nfe": req.nfe(sigmas),
        **(
            {
                "class_labels": labels.tolist(),
                "guidance": req.guidance,
                "label_source": "class_labels" if req.class_labels else "seed",
            }
            if labels is not None
            else {}
        ),
        "num_samples": num,
        "seeds": [seed, seed + num - 1],
        "seconds": round(seconds, 3),
        "images_per_second": round(num / max(seconds, 1e-9), 2),
        "device": req.device,
        "files": files,
    }
    (out_dir / "sample.json").write_text(json.dumps(info, indent=2))
    log.info(
        "%d images (%s, NFE %d) in %.1f s -> %s", num, req.sampler, info["nfe"], seconds, out_dir
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
