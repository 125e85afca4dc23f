"""Export entry point: ``python -m cmexp.export ckpt=PATH format=slim out=FILE``,
``format=zoo name=NAME`` or ``format=diffusers out=DIR``.

``slim``: the sampling-EMA weights and the metadata (what sampling, editing and evaluation
need; a fraction of a training checkpoint). ``zoo``: the same file shipped in ``cmexp/zoo``
under ``zoo:NAME`` with its SHA-256 in the registry and a provenance file (command, commit,
steps, images seen, wall time, machine, and the scores given with ``scores=``). ``diffusers``: a
``ConsistencyModelPipeline`` folder (``UNet2DModel`` + ``CMStochasticIterativeScheduler``) of an
ADMUNet consistency model (:mod:`cmexp.inference.to_diffusers`; docs/interop.md).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from cmexp.utils.cli import precheck, run_cli

log = logging.getLogger("cmexp.export")


def provenance_record(
    ckpt: Any, name: str, description: str, scores: dict[str, Any]
) -> dict[str, Any]:
    """The provenance of a zoo model from its training checkpoint's metadata."""
    meta = ckpt.meta
    record = meta.get("config") or {}
    prov = dict(record.get("provenance") or {}) if isinstance(record, dict) else {}
    config = ckpt.config
    batch = (config.get("dataset") or {}).get("batch_size")
    accum = (config.get("trainer") or {}).get("accumulate_grad_batches") or 1
    steps = int(ckpt.global_step or 0)
    images = int(meta.get("batches_seen", 0)) * int(batch or 0) * int(accum or 1)
    # the keys of the shipped records (cmexp/zoo/*.json; tests/unit/test_zoo.py checks them)
    return {
        "name": name,
        "file": f"{name}.pt",
        "kind": meta.get("kind"),
        "description": description,
        "command": prov.get("command", ""),
        "git_commit": prov.get("commit", ""),
        "git_dirty": prov.get("dirty"),
        "seed": config.get("seed"),
        "machine": prov.get("machine", {}),
        "started": prov.get("started", ""),
        "steps": steps,
        "batch_size": batch,
        "images_seen": images,
        "train_seconds": meta.get("train_seconds"),
        "settings": {
            k: meta.get(k)
            for k in (
                "sigma_min",
                "sigma_max",
                "sigma_data",
                "rho",
                "num_scales",
                "taus",
                "img_resolution",
                "img_channels",
                "label_dim",
            )
        },
        "scores": scores,
    }


def export(cfg: DictConfig) -> dict[str, Any]:
    """Write the slim file (and for ``format=zoo`` its registry entry and provenance)."""
    from cmexp import zoo
    from cmexp.inference.checkpoint import export_weights, read_checkpoint

    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise ValueError("ckpt is required: ckpt=/path/to/last.ckpt of a cmexp.train run")
    fmt = str(cfg.format)
    if fmt == "diffusers":
        return export_to_diffusers(cfg)
    ckpt = read_checkpoint(cfg.ckpt, "ckpt")
    if fmt == "slim":
        if not cfg.out:
            raise ValueError("format=slim needs out=/path/to/file.pt")
        dst = export_weights(cfg.ckpt, cfg.out, use_ema=bool(cfg.use_ema))
        print(f"wrote {dst}")
        return {"path": str(dst)}
    if fmt != "zoo":
        raise ValueError(f"format must be slim, zoo or diffusers, got {fmt!r}")
    name = str(cfg.name or "")
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"format=zoo needs name=NAME (letters, digits, _), got {name!r}")
    registry_path = zoo.ZOO_DIR / zoo.REGISTRY
    registry = json.loads(registry_path.read_text()) if registry_path.is_file() else {"models": {}}
    if name in registry["models"] and not cfg.replace:
        raise FileExistsError(
            f"name={name}: zoo:{name} exists; pass replace=true to ship a new version"
        )
    file, prov_file = f"{name}.pt", f"{name}.json"
    dst = zoo.ZOO_DIR / file
    if dst.exists():
        if not cfg.replace:
            raise FileExistsError(
                f"name={name}: {dst} exists (not in the registry); remove it or pass replace=true"
            )
        dst.unlink()
    export_weights(cfg.ckpt, dst, use_ema=bool(cfg.use_ema))
    scores = OmegaConf.to_container(cfg.scores, resolve=True) if cfg.scores else {}
    prov = provenance_record(ckpt, name, str(cfg.description or ""), scores)
    prov["sha256"] = zoo.sha256(dst)
    prov["size_bytes"] = dst.stat().st_size
    (zoo.ZOO_DIR / prov_file).write_text(json.dumps(prov, indent=2) + "\n")
    registry["models"][name] = {
        "file": file,
        "sha256": prov["sha256"],
        "kind": prov["kind"],
        "description": prov["description"],
        "provenance": prov_file,
    }
    registry["models"] = dict(sorted(registry["models"].items()))
    registry_path.write_text(json.dumps(registry, indent=2) + "\n")
    print(
        f"wrote {dst} ({prov['size_bytes'] / 1e6:.2f} MB, sha256 {prov['sha256'][:12]}) as zoo:{name}"
    )
    return {"path": str(dst), "provenance": prov}


def export_to_diffusers(cfg: DictConfig) -> dict[str, Any]:
    """``format=diffusers``: the sampling-EMA (or online) network as a diffusers pipeline folder
    at ``out`` (refused unless new or empty; nothing is written anywhere else)."""
    from cmexp import registry
    from cmexp.inference.loader import load_model
    from cmexp.inference.to_diffusers import export_diffusers

    if not cfg.out:
        raise ValueError("format=diffusers needs out=DIR (a new or empty folder for the pipeline)")
    loaded = load_model(
        cfg.ckpt,
        use_ema=bool(cfg.use_ema),
        kinds=registry.kinds("consistency"),
        purpose="format=diffusers exports consistency models",
    )
    dst = export_diffusers(loaded, cfg.out)
    print(f"wrote {dst} (load it with diffusers.ConsistencyModelPipeline.from_pretrained)")
    return {"path": str(dst)}


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    """Run :func:`export`; bad input ends with one ``error: ...`` line (exit code 2)."""
    run_cli(export, cfg)


if __name__ == "__main__":
    run_cli(precheck, "export")  # bad input: one line, exit 2, before anything is written
    main()
