"""Training entry point: ``python -m cmexp.train [+experiment=NAME] [overrides]``.

Builds datamodule, model, callbacks, loggers and trainer from the config and calls fit;
everything method-specific lives in the config groups and the method's folder
(``cmexp/methods/<name>/``, found through ``cmexp.registry``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from cmexp.utils import runs
from cmexp.utils.checks import ConfigError, accumulation_steps, check_train_config
from cmexp.utils.cli import override_key, precheck, reject_renamed_keys, run_cli

log = logging.getLogger("cmexp.train")

#: The README's main job: `python -m cmexp.train` with no +experiment trains this experiment.
MAIN_EXPERIMENT = "fmnist_cd_quick"

#: Set when this command line gave no +experiment and ``MAIN_EXPERIMENT`` was appended.
MAIN_EXPERIMENT_APPENDED = False


def train_overrides(argv: list[str], main_experiment: bool = True) -> list[str]:
    """The overrides of a ``cmexp.train`` command line in the order Hydra must apply them:
    ``+experiment=MAIN_EXPERIMENT`` appended when none is selected (``main_experiment``), and
    ``debug=X`` moved last as ``+debug=X``, so a debug config beats every experiment's values."""
    args = [a for a in argv if a.startswith("-") or override_key(a) != "debug"]
    debug = [
        a.split("=", 1)[1]
        for a in argv
        if not a.startswith("-") and override_key(a) == "debug" and "=" in a
    ]
    if main_experiment and not any(
        not a.startswith("-") and override_key(a) == "experiment" for a in args
    ):
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


def _run_record(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config, the Hydra group choices and the provenance (command, commit,
    machine), written into the run folder and into every checkpoint."""
    from hydra.core.hydra_config import HydraConfig

    resolved = OmegaConf.to_container(cfg, resolve=True)
    choices: dict[str, Any] = {}
    if HydraConfig.initialized():
        choices = {
            k: v
            for k, v in HydraConfig.get().runtime.choices.items()
            if not k.startswith("hydra/")
        }
    from cmexp.utils.provenance import run_provenance

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return {
        "config": resolved,
        "choices": choices,
        "provenance": run_provenance("cmexp.train", overrides),
    }


def _write_record(record: dict[str, Any], output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(record["config"]), output_dir / "config_resolved.yaml")
    OmegaConf.save(OmegaConf.create(record["choices"]), output_dir / "choices.yaml")


def _check_accelerator(cfg: DictConfig) -> None:
    import torch

    acc = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={acc} but no CUDA device is available here; use trainer=cpu"
        )
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    if acc in ("gpu", "cuda") and isinstance(devices, int) and devices > torch.cuda.device_count():
        raise ConfigError(
            f"trainer.devices={devices} but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )


def best_checkpoints_first(callbacks: list) -> list:
    """Order the callbacks so that monitored ``ModelCheckpoint`` s (``callbacks.best_checkpoint``)
    run before the periodic one that writes ``last.ckpt`` (Lightning keeps the relative order of
    checkpoint callbacks): a ``last.ckpt`` written at the step of an evaluation then holds the
    best checkpoint's updated state, so a resumed run compares against the best so far instead
    of starting afresh and keeping a worse "best"."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    monitored = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor is not None]
    return monitored + [c for c in callbacks if not any(c is m for m in monitored)]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one run from a composed config. Returns the final logged metrics and objects.

    Everything that can fail on bad input (the config, the data, the model and its teacher,
    the checkpoint to resume) is checked before the run folder is locked and written."""
    check_train_config(cfg)
    import lightning.pytorch as pl
    import torch

    output_dir = Path(cfg.paths.output_dir)
    _refuse_overwrite(cfg, output_dir)
    rank_zero = runs.global_rank_from_env() == 0
    if rank_zero and runs.is_locked(output_dir):
        runs.lock_run_folder(output_dir)  # raises: in use by another training
    _check_accelerator(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.backends.cuda.matmul.allow_tf32 = False  # numerics are a stated choice (EDM)
    torch.backends.cudnn.allow_tf32 = False
    datamodule, model, record = build(cfg)
    ckpt_path = _resume_checkpoint(cfg, output_dir, model)
    trainer, loggers = _trainer(cfg)
    locked_here = runs.lock_run_folder(output_dir) if rank_zero else False  # until the run ends
    try:
        _write_record(record, output_dir)
        for lg in loggers:
            lg.log_hyperparams({**record["choices"], "config": record["config"]})
        preempted = fit(trainer, model, datamodule, ckpt_path, output_dir / "checkpoints")
    finally:
        if locked_here:
            runs.release_run_folder(output_dir)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    log.info("run folder: %s", output_dir)
    return {
        "metrics": metrics,
        "model": model,
        "trainer": trainer,
        "datamodule": datamodule,
        "preempted": preempted,
    }


def _refuse_overwrite(cfg: DictConfig, output_dir: Path) -> None:
    """A fresh run never writes into a folder that holds another run's checkpoints."""
    ckpt_dir = output_dir / "checkpoints"
    if not cfg.get("ckpt_path") and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.ckpt")):
        raise ConfigError(
            f"paths.output_dir={output_dir} already holds checkpoints of an earlier run; refusing to "
            "overwrite them (pass ckpt_path=... to resume, or use a new folder)"
        )


def build(cfg: DictConfig) -> tuple[Any, Any, dict[str, Any]]:
    """The datamodule (its data read now: a bad file stops the run before its folder is
    written), the method's LightningModule (``cfg.model``; latent mode: on the codec's
    latents) and the run record it carries into every checkpoint."""
    datamodule = hydra.utils.instantiate(cfg.dataset)
    codec = latent_codec(cfg)  # latent mode: the autoencoder, checked before the model is built
    try:
        model = hydra.utils.instantiate(cfg.model)
    except Exception as err:
        hint = main_experiment_hint(cfg, err)
        if hint is None:
            raise
        raise ConfigError(hint) from err
    if codec is not None:
        from cmexp.data.latent import LatentDataModule

        model.attach_latent(codec)
        datamodule = LatentDataModule(
            datamodule, codec, int(cfg.latent.get("encode_batch_size", 500))
        )
    record = _run_record(cfg)
    model.run_config = record
    if hasattr(datamodule, "setup"):
        datamodule.setup("fit")
    if hasattr(model, "schedule"):
        from cmexp.diffusion.schedules import describe_curriculum

        log.info("schedule: %s", describe_curriculum(model.schedule))
    return datamodule, model, record


def experiments_of_model(choice: str) -> list[str]:
    """The experiments (``conf/experiment/*.yaml``) that select ``model=<choice>``, Fashion-MNIST
    ones first (``fmnist_<choice>`` before the others)."""
    import re

    from cmexp.utils.cli import CONF_DIR

    found = [
        p.stem
        for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))
        if re.search(rf"override /model: {re.escape(choice)}\s*(#.*)?$", p.read_text(), re.M)
    ]
    return sorted(found, key=lambda n: (n != f"fmnist_{choice}", not n.startswith("fmnist_"), n))


def main_experiment_hint(cfg: DictConfig, err: BaseException) -> str | None:
    """The one line for a model whose keys do not fit its ``_target_`` because the main job's
    experiment was appended to a command line without ``+experiment`` (``model=edm`` then keeps
    the CD experiment's ``model.taus``, ...): what happened and the way out. None otherwise."""
    from hydra.core.hydra_config import HydraConfig

    from cmexp.utils.cli import user_error

    user = user_error(err)
    if not MAIN_EXPERIMENT_APPENDED or not isinstance(user, ConfigError):
        return None
    if "do not fit its _target_" not in str(user):
        return None
    choice = ""
    if HydraConfig.initialized():
        choice = str(HydraConfig.get().runtime.choices.get("model") or "")
    fits = experiments_of_model(choice) if choice else []
    way_out = (
        f"pass +experiment={fits[0]}"
        if fits
        else "pass the +experiment=NAME of the model you want"
    )
    return (
        f"{str(user).splitlines()[0]}; no +experiment was given, so the main job's experiment "
        f"+experiment={MAIN_EXPERIMENT} was appended and its model settings stay: {way_out}"
        + (f" (the experiments of model={choice}: {', '.join(fits)})" if len(fits) > 1 else "")
    )


def _resume_checkpoint(cfg: DictConfig, output_dir: Path, model: Any) -> str | None:
    """``ckpt_path`` (``auto``/``last``: found among the experiment's runs), checked against
    the model before anything is written."""
    from cmexp.utils.checkpoint_io import check_resume_checkpoint

    auto = str(cfg.get("ckpt_path")) in ("auto", "last")
    ckpt_path = (
        resume_path(cfg, output_dir, getattr(model, "kind", None))
        if auto
        else cfg.get("ckpt_path")
    )
    if ckpt_path:
        check_resume_checkpoint(ckpt_path, model, "ckpt_path")
    return ckpt_path


def _trainer(cfg: DictConfig) -> tuple[Any, list[Any]]:
    """The Lightning trainer with the config's callbacks and loggers."""
    from cmexp.utils.checkpoint_io import AtomicCheckpointIO
    from cmexp.utils.instantiate import instantiate_dict

    callbacks = best_checkpoints_first(instantiate_dict(cfg.get("callbacks")))
    _wandb_offline_if_needed(cfg)
    loggers = instantiate_dict(cfg.get("logger"))
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        accumulate_grad_batches=accumulation_steps(cfg),
        plugins=[AtomicCheckpointIO()],
    )
    return trainer, loggers


def fit(trainer: Any, model: Any, datamodule: Any, ckpt_path: str | None, ckpt_dir: Path) -> Any:
    """``trainer.fit``; a preemption (SIGTERM, SIGINT, SIGUSR1) is returned as the
    :class:`~cmexp.callbacks.preemption.TrainingPreempted` it raised (None: ran to the end)."""
    from cmexp.callbacks.preemption import MARKER, TrainingPreempted

    if hasattr(model, "snapshot_rng"):
        model.snapshot_rng()  # DDP ranks continue the single-process RNG stream
    (ckpt_dir / MARKER).unlink(missing_ok=True)
    try:
        with forward_signals_to_child_ranks(trainer):
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except TrainingPreempted as stop:
        (ckpt_dir / MARKER).unlink(missing_ok=True)
        return stop
    except Exception:
        # ddp_spawn / ddp_fork: a rank's TrainingPreempted reaches this process as a
        # ProcessRaisedException; rank 0 recorded the stop next to the checkpoint it saved
        preempted = TrainingPreempted.from_marker(ckpt_dir)
        if preempted is None:
            raise
        return preempted
    return None


@contextlib.contextmanager
def forward_signals_to_child_ranks(trainer: Any) -> Iterator[None]:
    """Under ``ddp_spawn``/``ddp_fork`` every rank is a child process and this one only waits:
    a preemption signal sent to it (``kill PID``, Ctrl-C) is passed on to the ranks, whose
    ``PreemptionCallback`` saves and stops them, instead of killing this process and orphaning
    them mid-step. Other strategies run rank 0 here: nothing to do."""
    import multiprocessing

    launcher = getattr(trainer.strategy, "launcher", None)
    if type(launcher).__name__ != "_MultiProcessingLauncher":
        yield
        return
    cb = next((c for c in trainer.callbacks if type(c).__name__ == "PreemptionCallback"), None)
    sigs = cb.signals if cb is not None else ()

    def forward(signum: int, frame: Any) -> None:
        for child in multiprocessing.active_children():
            if child.pid is not None:
                os.kill(child.pid, signum)

    previous = {}
    try:
        for sig in sigs:
            previous[sig] = signal.signal(sig, forward)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def latent_codec(cfg: DictConfig) -> Any:
    """Latent mode (``latent=autoencoder``): the codec of ``latent.autoencoder_path``, its
    latent shape checked against ``latent.resolution``/``latent.channels`` and the teacher
    (``model.teacher_path``) checked to live in the same latent space. None in pixel space."""
    if not cfg.get("latent"):
        return None
    from cmexp.inference.latent import check_latent_shape, check_teacher_latent, load_codec

    codec = load_codec(cfg.latent.autoencoder_path, "latent.autoencoder_path")
    check_latent_shape(
        codec, cfg.latent.resolution, cfg.latent.channels, "latent.channels x latent.resolution^2"
    )
    teacher = OmegaConf.select(cfg, "model.teacher_path", default=None)
    if teacher:
        from cmexp.inference.checkpoint import read_checkpoint

        check_teacher_latent(
            read_checkpoint(teacher, "model.teacher_path").meta, codec, str(teacher)
        )
    return codec


def resume_path(cfg: DictConfig, output_dir: Path, kind: str | None) -> str | None:
    """``ckpt_path=auto`` / ``last``: the newest readable checkpoint of this run folder, else of
    the latest earlier run of the experiment (sibling folders, newest first). ``auto`` starts
    afresh when there is none; ``last`` is then an error."""
    from cmexp.utils.checkpoint_io import find_resume_checkpoint

    runs = output_dir.parent
    siblings = (
        sorted((p for p in runs.iterdir() if p.is_dir() and p != output_dir), reverse=True)
        if runs.is_dir()
        else []
    )
    found = find_resume_checkpoint([output_dir, *siblings], kind)
    if found is None:
        if str(cfg.ckpt_path) == "last":
            raise ConfigError(
                f"ckpt_path=last: no readable checkpoint in {output_dir}/checkpoints or in the runs under {runs}"
            )
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
    MAIN_EXPERIMENT_APPENDED = not any(
        not a.startswith("-") and override_key(a) == "experiment" for a in sys.argv[1:]
    )
    sys.argv[1:] = train_overrides(sys.argv[1:])
    run_cli(
        precheck, "train"
    )  # bad input: one line, exit 2, before Hydra writes the run folder; locks it
    main()
