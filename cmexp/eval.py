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
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from cmexp.utils.checks import check_config
from cmexp.utils.cli import precheck, run_cli

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
    """Sample (``ckpt``) or read (``samples``) image sets, score them, write the results: load
    (extractor, model or samples, reference features: everything that can fail on bad input,
    before the run folder is written), run the sample sets, score, write ``metrics.json``."""
    check_config("eval", cfg)
    from hydra.utils import instantiate

    from cmexp.inference import pick_device
    from cmexp.metrics.features import check_features_fit
    from cmexp.metrics.suite import describe

    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    features = instantiate(cfg.features).to(device)
    protocol: dict[str, Any] = {**describe(features), "seed": int(cfg.seed)}
    req = _prepare_model(cfg, protocol) if cfg.ckpt else None
    u8 = None
    if req is None:
        u8 = read_samples(cfg.samples)
        protocol.update({"samples": str(cfg.samples), "num_samples": len(u8)})
        check_features_fit(
            features, u8.shape[3], u8.shape[1], f"the images of samples={cfg.samples}"
        )
    else:
        loaded = req.loaded
        check_features_fit(
            features, loaded.img_channels, loaded.img_resolution, f"the samples of ckpt={cfg.ckpt}"
        )
    if cfg.get("reference"):  # reference statistics (mu, sigma) instead of real images
        dm, real = None, _reference_stats(cfg, features, protocol)
    else:
        dm, real = _reference(cfg, _reference_dataset(cfg, req), features, device, protocol)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = _sample_sets(cfg, req, out_dir, protocol) if req is not None else _read_set(cfg, u8)
    labels = req.labels(int(cfg.seed), int(cfg.num_samples)) if req is not None else None
    results = _score(cfg, sets, features, real, dm, labels, device)
    protocol["fid_protocol"] = _fid_protocol(protocol, features)
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


def _prepare_model(cfg: DictConfig, protocol: dict[str, Any]) -> Any:
    """The shared inference preamble (``cmexp.inference.request.prepare``) and its protocol."""
    from cmexp.inference.request import prepare

    req = prepare(cfg, taus_per_set=True)
    n, seed = int(cfg.num_samples), int(cfg.seed)
    described = req.describe(cfg)
    protocol.update(
        {
            **{
                k: described[k]
                for k in ("ckpt", "kind", "weights", "rho", "num_scales", "clip_denoised")
            },
            "num_samples": n,
            "seeds": [seed, seed + n - 1],
            "sets": {},
        }
    )
    labels = req.labels(seed, n)
    if labels is not None:
        protocol.update(
            {
                "guidance": req.guidance,
                "class_labels": req.class_labels or "one per seed",
                "label_counts": torch_bincount(labels, req.loaded.label_dim),
            }
        )
    return req


def _reference_dataset(cfg: DictConfig, req: Any) -> dict[str, Any]:
    """The reference data: the checkpoint's own dataset, else (scoring ``samples=``, or a
    foreign file whose data folder only the user can name) the command line's ``dataset``."""
    from omegaconf import OmegaConf

    dataset = {}
    if req is not None and req.loaded.dataset.get("data_dir", "") is not None:
        dataset = req.loaded.dataset
    return dataset or OmegaConf.to_container(cfg.dataset, resolve=True)


def _reference(
    cfg: DictConfig, dataset: dict[str, Any], features: Any, device: str, protocol: dict
) -> tuple[Any, dict[str, Any]]:
    """The reference datamodule and its (cached) real features."""
    from cmexp.inference.data import reference_datamodule
    from cmexp.metrics.features import check_features_fit
    from cmexp.metrics.suite import RealFeatureCache, reference_features

    dm = reference_datamodule(dataset)
    check_features_fit(
        features, dm.channels, dm.resolution, f"the reference images ({type(dm).__name__})"
    )
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
    protocol["reference"] = {
        "dataset": type(dm).__name__,
        "split": str(cfg.real_split),
        "resolution": int(dm.resolution),
        "count": len(real["features"]),
    }
    return dm, real


def _reference_stats(cfg: DictConfig, features: Any, protocol: dict) -> dict[str, Any]:
    """``reference=``: a statistics ``.npz`` (``mu``, ``sigma``: EDM's ``cifar10-32x32.npz``,
    clean-fid's ``cifar10_legacy_tensorflow_train_32.npz``, or your own) by path, or one of the
    pinned names (downloaded into ``cache_dir`` when missing there); its SHA-256 is checked
    against the pin (``cmexp.metrics.pins``) and recorded."""
    from cmexp.metrics.pins import PINNED, check_file, download
    from cmexp.metrics.suite import read_reference_stats

    value = str(cfg.reference)
    path = Path(value).expanduser()
    if not path.exists() and value in PINNED and value.endswith(".npz"):
        cached = Path(str(cfg.cache_dir)) / value
        path = (
            cached if cached.is_file() else download(value, Path(str(cfg.cache_dir)), "reference")
        )
    if path.is_dir():
        raise ValueError(f"reference={value} is a folder; expected an .npz with 'mu' and 'sigma'")
    if not path.is_file():
        known = ", ".join(k for k in PINNED if k.endswith(".npz"))
        raise FileNotFoundError(
            f"reference={value}: no such file; give an .npz with 'mu' and 'sigma' or one of {known}"
        )
    record = check_file(path, "reference")
    stats = read_reference_stats(path, "reference")
    dim = int(stats["mu"].shape[0])
    if dim != int(getattr(features, "num_features", dim)):
        raise ValueError(
            f"reference={value} holds {dim}-d statistics but the features ({type(features).__name__}) "
            f"are {features.num_features}-d: use the extractor the statistics were made with "
            "(features=inception for FID)"
        )
    protocol["reference"] = {"statistics": record, "dim": dim}
    return stats


def _fid_protocol(protocol: dict[str, Any], features: Any) -> dict[str, Any]:
    """What a reader needs to compare this FID with a paper's: the reference, the sample count
    and seeds, the feature weights and their SHA-256 pin status."""
    pin = getattr(features, "pin", None) or {}
    return {
        "reference": protocol.get("reference"),
        "num_samples": protocol.get("num_samples"),
        "seeds": protocol.get("seeds"),
        "weights": protocol.get("weights"),
        "weights_sha256": pin.get("sha256", protocol.get("weights_sha256")),
        "weights_pin": pin.get("pin", "none"),
    }


def _sample_sets(cfg: DictConfig, req: Any, out_dir: Path, protocol: dict) -> dict[str, Any]:
    """Generate every plan of the request, write ``samples_<set>.npz`` and grids, and return
    the uint8 sets (what is scored is exactly what the files hold)."""
    from cmexp.inference.generate import save_samples
    from cmexp.utils.images import to_uint8

    n, seed = int(cfg.num_samples), int(cfg.seed)
    labels = req.labels(seed, n)
    sets: dict[str, Any] = {}
    for set_name, sigmas in req.plans:
        images = req.generate(sigmas, n, seed, int(cfg.batch_size))
        save_samples(
            images, out_dir, int(cfg.grid_size), name=f"samples_{set_name}", labels=labels
        )
        sets[set_name] = to_uint8(images)
        protocol["sets"][set_name] = {
            "sigmas": [float(s) for s in sigmas],
            "nfe": req.nfe(sigmas),
            "sampler": req.sampler,
            "options": req.options,
            "clip_denoised": req.clip_denoised,
        }
    return sets


def _read_set(cfg: DictConfig, u8: Any) -> dict[str, Any]:
    """Scoring a file: its images, and a grid of them."""
    from cmexp.utils.images import image_grid, save_png

    out = Path(cfg.paths.output_dir) / "samples_grid.png"
    save_png(
        image_grid(u8[: int(cfg.grid_size)].permute(0, 3, 1, 2).float() / 127.5 - 1), out, scale=2
    )
    return {"samples": u8}


def _score(
    cfg: DictConfig,
    sets: dict[str, Any],
    features: Any,
    real: dict[str, Any],
    dm: Any,
    labels: Any,
    device: str,
) -> dict[str, Any]:
    """FD/KID/IS/precision-recall of every set; a class-conditional model's per-class FD and
    class accuracy too."""
    from cmexp.metrics.suite import extract, score, score_against_stats

    name = str(getattr(features, "name", ""))
    results: dict[str, Any] = {}
    for set_name, images in sets.items():
        fake = extract(features, images, int(cfg.batch_size), device, True, f"features {set_name}")
        if "mu" in real:  # reference statistics: FD (and IS) only
            results[set_name] = score_against_stats(real, fake, name)
        else:
            results[set_name] = score(real, fake, name, kid_subset_size=int(cfg.kid_subset_size))
        if labels is not None and dm is not None:
            from cmexp.metrics.classes import per_class_scores

            real_labels = dm.real_labels(len(real["features"]), str(cfg.real_split))
            results[set_name].update(per_class_scores(real, real_labels, fake, labels, name))
        log.info("%s: %s", set_name, {k: round(v, 4) for k, v in results[set_name].items()})
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Run :func:`evaluate`; bad input ends with one ``error: ...`` line (exit code 2)."""
    run_cli(evaluate, cfg)


if __name__ == "__main__":
    run_cli(precheck, "eval")  # bad input: one line, exit 2, before Hydra makes the run folder
    main()
