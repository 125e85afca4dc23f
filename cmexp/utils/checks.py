"""Up-front validation of a composed training config: one clear message per mistake, naming
the config key and what is expected, before anything heavy is built."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the expected value."""


def _sel(cfg: DictConfig, key: str):  # noqa: ANN202
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None)


def check_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the mistakes users make most often."""
    smin, smax = _sel(cfg, "model.sigma_min"), _sel(cfg, "model.sigma_max")
    if smin is not None and smax is not None:
        if not smin > 0:
            raise ConfigError(f"model.sigma_min must be > 0, got {smin}")
        if not smin < smax:
            raise ConfigError(f"model.sigma_min={smin} must be < model.sigma_max={smax}")
    s0, s1 = _sel(cfg, "schedule.s0"), _sel(cfg, "schedule.s1")
    if s0 is not None and s1 is not None and s1 < s0:
        raise ConfigError(f"schedule.s1={s1} must be >= schedule.s0={s0}")
    for key in ("schedule.mu", "schedule.mu0"):
        mu = _sel(cfg, key)
        if mu is not None and not 0 <= mu < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {mu}")
    ema = _sel(cfg, "model.ema_decay")
    if ema is not None and not 0 <= ema < 1:
        raise ConfigError(f"model.ema_decay must be in [0, 1), got {ema}")
    target = str(_sel(cfg, "model._target_") or "")
    if target.endswith(("CDLitModule", "PDLitModule")):
        path = _sel(cfg, "model.teacher_path")
        if not path:
            what = "consistency distillation" if target.endswith("CDLitModule") else "progressive distillation"
            raise ConfigError(
                f"model.teacher_path is required for {what}: set "
                "model.teacher_path=/path/to/last.ckpt of an EDM run (e.g. +experiment=fmnist_edm)"
            )
        from cmexp.inference.checkpoint import resolve_source

        try:
            resolve_source(path, "model.teacher_path")
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(str(err)) from None
    max_steps = _sel(cfg, "trainer.max_steps")
    if max_steps is not None and max_steps != -1 and max_steps < 1:
        raise ConfigError(f"trainer.max_steps must be >= 1, got {max_steps}")
    if target.endswith("PDLitModule"):
        _check_pd_rounds(cfg, max_steps)
    accumulation_steps(cfg)  # global_batch_size fits the devices
    ckpt = _sel(cfg, "ckpt_path")
    if ckpt and str(ckpt) not in ("auto", "last") and not Path(str(ckpt)).expanduser().is_file():
        raise ConfigError(f"ckpt_path={ckpt}: no such file (or ckpt_path=auto: the newest readable checkpoint of the run)")


def _check_pd_rounds(cfg: DictConfig, max_steps: int | None) -> None:
    """The rounds of progressive distillation fit their teacher and the run's length."""
    from cmexp.modules.pd import check_rounds

    try:
        _, _, lengths = check_rounds(
            _sel(cfg, "model.teacher_steps"), _sel(cfg, "model.num_rounds"), _sel(cfg, "model.steps_per_round")
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if max_steps is not None and max_steps != -1 and max_steps > sum(lengths):
        raise ConfigError(
            f"trainer.max_steps={max_steps} exceeds the rounds' total sum(model.steps_per_round) = {sum(lengths)}; "
            "lengthen the rounds or shorten the run"
        )


def accumulation_steps(cfg: DictConfig) -> int:
    """Gradient-accumulation steps that keep ``global_batch_size`` (512 for CIFAR-10, CM
    Table 3) whatever the device count: ``global / (dataset.batch_size x trainer.devices x
    trainer.num_nodes)``. Without ``global_batch_size``, ``trainer.accumulate_grad_batches``."""
    total = _sel(cfg, "global_batch_size")
    if not total:
        return int(_sel(cfg, "trainer.accumulate_grad_batches") or 1)
    batch, devices, nodes = _sel(cfg, "dataset.batch_size"), _sel(cfg, "trainer.devices"), _sel(cfg, "trainer.num_nodes") or 1
    if not isinstance(devices, int):
        raise ConfigError(f"global_batch_size={total} needs an integer trainer.devices, got {devices!r}")
    per_step = int(batch) * devices * int(nodes)
    if total % per_step:
        raise ConfigError(
            f"global_batch_size={total} must be a multiple of dataset.batch_size={batch} x trainer.devices={devices} "
            f"x trainer.num_nodes={nodes} = {per_step}; e.g. dataset.batch_size={max(1, total // (devices * int(nodes)))}"
        )
    return total // per_step
