"""Offline evaluator: ``python -m cmexp.eval ckpt=PATH num_samples=50000 steps=[1,2]`` or
``python -m cmexp.eval samples=PATH``.

Sample sets are written as ``samples_<set>.npz`` (``arr_0``: uint8 ``[N,H,W,C]``, the OpenAI
evaluator convention) and scored in the features of ``conf/features/`` against the reference
split; ``metrics.json`` records every number and the protocol (extractor and weights hash,
reference set and split, counts, seeds, sigmas, NFE).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from cmexp.utils.checks import check_config
from cmexp.utils.cli import list_or_none, precheck, run_cli

log = logging.getLogger("cmexp.eval")


def read_samples(path: str) -> Any:
    """uint8 ``[N,H,W,C]`` from an ``.npz`` (key ``arr_0``) or a folder of PNG/JPG images."""
    import zipfile

    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    p = Path(str(path)).expanduser()
    if p.is_file() and p.suffix == ".npz":
        try:
            with np.load(p) as data:
                if "arr_0" not in data:
                    raise ValueError(
                        f"samples={path}: the npz has no 'arr_0' array (found {list(data.keys())})"
                    )
                arr = data["arr_0"]
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ValueError(
                f"samples={path} is not a readable .npz file ({type(err).__name__}: truncated or "
                "corrupt?)"
            ) from None
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise FileNotFoundError(f"samples={path}: no PNG/JPG images in the folder")
        images = []
        for f in files:
            try:
                with Image.open(f) as im:
                    images.append(np.asarray(im))
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
                raise ValueError(
                    f"samples={path}: {f} is not a readable image ({type(err).__name__})"
                ) from None
        if len({a.shape for a in images}) > 1:
            raise ValueError(
                f"samples={path}: the images differ in size or channels ({sorted({a.shape for a in images})})"
            )
        arr = np.stack(images)
    else:
        raise FileNotFoundError(f"samples={path}: expected an .npz file or a folder of PNGs")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(
            f"samples={path}: expected uint8 [N,H,W,C] with C in (1, 3), got {arr.dtype} {arr.shape}"
        )
    if len(arr) < 2:
        raise ValueError(f"samples={path} holds {len(arr)} image(s); the metrics need at least 2")
    return torch.from_numpy(arr)


def torch_bincount(labels: Any, num_classes: int) -> list[int]:
    """How many samples each class got (recorded in the protocol)."""
    import torch

    return torch.bincount(labels, minlength=num_classes).tolist()


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Sample (``ckpt``) or read (``samples``) image sets, score them, write the results.
    Everything that can fail on bad input (extractor, checkpoint, samples, reference data) is
    loaded before the run folder is written."""
    check_config("eval", cfg)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from cmexp.inference import (
        check_sampler,
        generate,
        load_from_config,
        nfe,
        pick_device,
        sampler_options,
        save_samples,
        sigma_plan,
        solver_plan,
    )
    from cmexp.inference.data import reference_datamodule
    from cmexp.metrics.suite import RealFeatureCache, describe, extract, reference_features, score
    from cmexp.utils.images import image_grid, save_png, to_uint8

    device = pick_device(cfg.device)
    out_dir = Path(cfg.paths.output_dir)
    features = instantiate(cfg.features).to(device)
    name = str(getattr(features, "name", ""))
    t0 = time.perf_counter()

    protocol: dict[str, Any] = {**describe(features), "seed": int(cfg.seed)}
    plans = []
    class_labels = guidance = labels = None
    passes = 1
    if cfg.ckpt:
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
        dataset = (
            loaded.dataset if loaded.dataset.get("data_dir", "") is not None else {}
        )  # None: a foreign file's
        dataset = dataset or OmegaConf.to_container(
            cfg.dataset, resolve=True
        )  # folder only the user can name
        n = int(cfg.num_samples)
        sampler = check_sampler(cfg.get("sampler"), loaded.spec)  # null: the model's own
        options = sampler_options(sampler, cfg)
        if loaded.spec.uses_solver:
            solver_steps = list_or_none(cfg.get("solver_steps"), "solver_steps")
            sigs = (
                [sigma_plan(loaded.spec)]
                if solver_steps is None
                else [solver_plan(loaded.spec, k) for k in solver_steps]
            )
            plans += [(f"{sampler}{nfe(sig, sampler, passes)}nfe", sig, sampler) for sig in sigs]
        else:
            taus = list_or_none(cfg.taus, "taus")
            steps = cfg.steps if isinstance(cfg.steps, Sequence) else [cfg.steps]
            for k in steps:
                mids = taus[: int(k) - 1] if taus is not None else None
                plans.append((f"{k}step", sigma_plan(loaded.spec, int(k), mids), sampler))
        protocol.update(
            {
                "ckpt": str(cfg.ckpt),
                "kind": loaded.kind,
                "weights": "ema" if cfg.use_ema else "online",
                "rho": loaded.spec.rho,
                "num_scales": loaded.spec.num_scales,
                "num_samples": n,
                "seeds": [int(cfg.seed), int(cfg.seed) + n - 1],
                "sets": {},
            }
        )
        labels = sample_labels(loaded, range(int(cfg.seed), int(cfg.seed) + n), class_labels)
        if labels is not None:
            protocol.update(
                {
                    "guidance": guidance,
                    "class_labels": class_labels or "one per seed",
                    "label_counts": torch_bincount(labels, loaded.label_dim),
                }
            )
    else:
        dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
        u8 = read_samples(cfg.samples)
        protocol.update({"samples": str(cfg.samples), "num_samples": len(u8)})

    dm = reference_datamodule(dataset)
    real = reference_features(
        RealFeatureCache(cfg.cache_dir),
        features,
        dm,
        str(cfg.real_split),
        int(cfg.num_real),
        int(cfg.batch_size),
        device,
        progress=True,
    )
    if len(real["features"]) < 2:
        raise ValueError(
            f"real_split={cfg.real_split} of the reference data holds {len(real['features'])} image(s); "
            "the metrics need at least 2"
        )
    protocol.update(
        {
            "reference": {
                "dataset": type(dm).__name__,
                "split": str(cfg.real_split),
                "resolution": int(dm.resolution),
                "count": len(real["features"]),
            }
        }
    )

    sets: dict[str, Any] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.ckpt:
        for set_name, sigmas, sampler in plans:
            images = generate(
                loaded,
                n,
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
            save_samples(
                images, out_dir, int(cfg.grid_size), name=f"samples_{set_name}", labels=labels
            )
            sets[set_name] = to_uint8(images)  # score exactly what samples_<set>.npz holds
            protocol["sets"][set_name] = {
                "sigmas": [float(s) for s in sigmas],
                "nfe": nfe(sigmas, sampler, passes),
                "sampler": sampler,
                "options": options,
            }
    else:
        sets["samples"] = u8
        save_png(
            image_grid(u8[: int(cfg.grid_size)].permute(0, 3, 1, 2).float() / 127.5 - 1),
            out_dir / "samples_grid.png",
            scale=2,
        )
    results: dict[str, Any] = {}
    for set_name, images in sets.items():
        fake = extract(features, images, int(cfg.batch_size), device, True, f"features {set_name}")
        results[set_name] = score(real, fake, name, kid_subset_size=int(cfg.kid_subset_size))
        if (
            labels is not None
        ):  # a class-conditional model: FD per class and the samples' class accuracy
            from cmexp.metrics.classes import per_class_scores

            real_labels = dm.real_labels(len(real["features"]), str(cfg.real_split))
            results[set_name].update(per_class_scores(real, real_labels, fake, labels, name))
        log.info("%s: %s", set_name, {k: round(v, 4) for k, v in results[set_name].items()})
    payload = {
        "metrics": results,
        "protocol": protocol,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
    for set_name, m in results.items():
        print(set_name, " ".join(f"{k}={v:.4f}" for k, v in m.items()))
    print(f"wrote {out_dir / 'metrics.json'}")
    return payload


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Run :func:`evaluate`; bad input ends with one ``error: ...`` line (exit code 2)."""
    run_cli(evaluate, cfg)


if __name__ == "__main__":
    run_cli(precheck, "eval")  # bad input: one line, exit 2, before Hydra makes the run folder
    main()
