"""Training entry point: ``python -m cmexp.train [+experiment=NAME] [overrides]``.

Builds datamodule, model, callbacks, loggers and trainer from the config and calls fit;
everything method-specific lives in the config groups and ``cmexp.modules``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from cmexp.callbacks.preemption import TrainingPreempted
from cmexp.utils.checkpoint_io import AtomicCheckpointIO
from cmexp.utils.checks import ConfigError, accumulation_steps, check_train_config
from cmexp.utils.cli import override_key, reject_renamed_keys, run_cli

log = logging.getLogger("cmexp.train")

#: The README's main job: `python -m cmexp.train` with no +experiment trains this experiment.
MAIN_EXPERIMENT = "fmnist_ct_pseudo_huber"


def train_overrides(argv: list[str], main_experiment: bool = True) -> list[str]:
    """The overrides of a ``cmexp.train`` command line in the order Hydra must apply them:
    ``+experiment=MAIN_EXPERIMENT`` appended when none is selected (``main_experiment``), and
    ``debug=X`` moved last as ``+debug=X``, so a debug config beats every experiment's values."""
    args = [a for a in argv if a.startswith("-") or override_key(a) != "debug"]
    debug = [a.split("=", 1)[1] for a in argv if not a.startswith("-") and override_key(a) == "debug" and "=" in a]
    if main_experiment and not any(not a.startswith("-") and override_key(a) == "experiment" for a in args):
        args.append(f"+experiment={MAIN_EXPERIMENT}")
    return [*args, *(f"+debug={d}" for d in debug if d not in ("null", "none", ""))]


def _wandb_offline_if_needed(cfg: DictConfig) -> None:
    """Log W&B offline when no API key is configured (syncable later with `wandb sync`)."""
    if "wandb" not in (cfg.get("logger") or {}) or os.environ.get("WANDB_MODE"):
        return
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )
    if not has_key:
        os.environ["WANDB_MODE"] = "offline"
        log.info("W&B: no API key found, logging offline (upload later with `wandb sync`)")


def _record_run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Write the resolved config and the Hydra group choices into the run folder; the record
    (with the command, commit and machine) goes into every checkpoint."""
    from hydra.core.hydra_config import HydraConfig

    resolved = OmegaConf.to_container(cfg, resolve=True)
    choices: dict[str, Any] = {}
    if HydraConfig.initialized():
        choices = {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra/")}
    from cmexp.utils.provenance import run_provenance

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(resolved), output_dir / "config_resolved.yaml")
    OmegaConf.save(OmegaConf.create(choices), output_dir / "choices.yaml")
    return {"config": resolved, "choices": choices, "provenance": run_provenance("cmexp.train", overrides)}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one run from a composed config. Returns the final logged metrics and objects."""
    check_train_config(cfg)
    import lightning.pytorch as pl
    import torch

    from cmexp.utils.instantiate import instantiate_dict

    output_dir = Path(cfg.paths.output_dir)
    ckpt_dir = output_dir / "checkpoints"
    auto_resume = str(cfg.get("ckpt_path")) in ("auto", "last")
    if not cfg.get("ckpt_path") and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.ckpt")):
        raise ConfigError(
            f"paths.output_dir={output_dir} already holds checkpoints of an earlier run; refusing to "
            "overwrite them (pass ckpt_path=... to resume, or use a new folder)"
        )
    record = _record_run(cfg, output_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.backends.cuda.matmul.allow_tf32 = False  # numerics are a stated choice (EDM)
    torch.backends.cudnn.allow_tf32 = False

    datamodule = hydra.utils.instantiate(cfg.dataset)
    model = hydra.utils.instantiate(cfg.model)
    model.run_config = record
    ckpt_path = resume_path(cfg, output_dir, getattr(model, "kind", None)) if auto_resume else cfg.get("ckpt_path")
    if hasattr(model, "schedule"):
        from cmexp.diffusion.schedules import describe_curriculum

        log.info("schedule: %s", describe_curriculum(model.schedule))
    callbacks = instantiate_dict(cfg.get("callbacks"))
    _wandb_offline_if_needed(cfg)
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, accumulate_grad_batches=accumulation_steps(cfg),
        plugins=[AtomicCheckpointIO()],
    )
    for lg in loggers:
        lg.log_hyperparams({**record["choices"], "config": record["config"]})
    if hasattr(model, "snapshot_rng"):
        model.snapshot_rng()  # DDP ranks continue the single-process RNG stream
    preempted = None
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except TrainingPreempted as stop:
        preempted = stop
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    log.info("run folder: %s", output_dir)
    return {"metrics": metrics, "model": model, "trainer": trainer, "datamodule": datamodule, "preempted": preempted}


def resume_path(cfg: DictConfig, output_dir: Path, kind: str | None) -> str | None:
    """``ckpt_path=auto`` / ``last``: the newest readable checkpoint of this run folder, else of
    the latest earlier run of the experiment (sibling folders, newest first). ``auto`` starts
    afresh when there is none; ``last`` is then an error."""
    from cmexp.utils.checkpoint_io import find_resume_checkpoint

    runs = output_dir.parent
    siblings = sorted((p for p in runs.iterdir() if p.is_dir() and p != output_dir), reverse=True) if runs.is_dir() else []
    found = find_resume_checkpoint([output_dir, *siblings], kind)
    if found is None:
        if str(cfg.ckpt_path) == "last":
            raise ConfigError(f"ckpt_path=last: no readable checkpoint in {output_dir}/checkpoints or in the runs under {runs}")
        log.info("ckpt_path=auto: no checkpoint to resume from under %s; starting afresh", runs)
        return None
    log.info("ckpt_path=%s: resuming from %s", cfg.ckpt_path, found)
    return str(found)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run :func:`train`; bad input ends with one ``error: ...`` line (exit code 2) unless
    ``HYDRA_FULL_ERROR=1`` asks for the traceback."""
    try:
        out = run_cli(train, cfg)
    finally:
        try:
            import wandb

            if wandb.run is not None:
                wandb.finish()
        except ImportError:
            pass
    if out["preempted"] is not None:  # saved at a step boundary; never report success
        sys.exit(out["preempted"].exit_code)
    return out["metrics"].get("train/loss")


if __name__ == "__main__":
    reject_renamed_keys("train")
    sys.argv[1:] = train_overrides(sys.argv[1:])
    main()
