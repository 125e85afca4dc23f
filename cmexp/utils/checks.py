"""Up-front validation of a composed config: one clear message per mistake, naming the config
key (or file) and what is expected, before anything heavy is built or any folder is written.

Nothing here imports torch: :func:`check_config` runs on the command line before Hydra starts
the job (``cmexp.utils.cli.precheck``), so a bad value fails in well under a second. The
value rules are one table per entry point (:data:`SCHEMAS`: key -> type, range or choices,
applied to the keys present in the composed config); the checks between keys and the file
checks follow the tables. Only generic rules live here (data, nets, trainer, callbacks, files,
devices, the keys every method shares): a training method's own keys and checks are in its
folder (``cmexp/methods/<name>/rules.py``), found through :mod:`cmexp.registry` by the
config's ``model._target_``. Checks that need a model or data (a checkpoint's kind or
architecture, an image's size) stay with the code that loads them.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

import cmexp.utils.resolvers  # noqa: F401 - registers ${cmexp_label_dim:...} (dataset.use_labels)


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the expected value."""


#: Image files read from folders (``dataset=imagefolder``, edit's ``images_dir``).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


# ------------------------------------------------------------------------------ value rules
class Rule:
    """One key's expected value: ``test(value)`` and the words for it ("an integer >= 1")."""

    def __init__(
        self, expected: str, test: Callable[[Any], bool], null: bool = False, bad: tuple = ()
    ) -> None:
        self.expected, self.test, self.null = expected, test, null
        self.bad = bad  # values this rule rejects (the schema tests try each one on every key)

    def check(self, key: str, value: Any) -> None:
        if value is None and self.null:
            return
        if not self.test(value):
            raise ConfigError(f"{key} must be {self.describe()}, got {_show(value)}")

    def describe(self) -> str:
        return self.expected + (" or null" if self.null else "")


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def Int(
    lo: int | None = None,
    hi: int | None = None,
    null: bool = False,
    also: tuple = (),
    note: str = "",
) -> Rule:
    """An integer in ``[lo, hi]`` (bools and 2.0 are not integers), or one of ``also``."""
    words = "an integer" + (f" >= {lo}" if lo is not None and hi is None else "")
    words += f" in [{lo}, {hi}]" if lo is not None and hi is not None else ""
    words += f" <= {hi}" if hi is not None and lo is None else ""
    words += "".join(f", or {a}" for a in also) + note

    def test(v: Any) -> bool:
        if is_int(v) and v in also:
            return True
        return is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)

    bad = (
        "abc",
        2.5,
        *((lo - 1,) if lo is not None and lo - 1 not in also else ()),
        *((hi + 1,) if hi is not None else ()),
    )
    return Rule(words, test, null, bad)


def Num(
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    null: bool = False,
) -> Rule:
    """A finite number (int or float) in the interval given."""
    if lo is not None and hi is not None:
        words = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        words = f"a number {'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        words = f"a number {'<' if hi_open else '<='} {hi}"
    else:
        words = "a number"

    def test(v: Any) -> bool:
        if not is_num(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    bad = (
        "abc",
        *((lo if lo_open else lo - 1,) if lo is not None else ()),
        *((hi if hi_open else hi + 1,) if hi is not None else ()),
    )
    return Rule(words, test, null, bad)


def Bool(null: bool = False) -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool), null, ("maybe", 1))


def OneOf(*choices: Any, null: bool = False) -> Rule:
    return Rule(
        "one of " + ", ".join(str(c) for c in choices),
        lambda v: not isinstance(v, bool) and v in choices,
        null,
        ("not-a-choice",),
    )


def Str(null: bool = False, empty: bool = False) -> Rule:
    return Rule(
        "a string" if empty else "a non-empty string",
        lambda v: isinstance(v, str) and (empty or bool(v.strip())),
        null,
        (5,),
    )


def Numbers(
    lo: float | None = None,
    lo_open: bool = False,
    min_len: int = 0,
    ints: bool = False,
    null: bool = False,
    example: str = "",
) -> Rule:
    """A list of numbers (integers with ``ints``), each ``> lo`` / ``>= lo``, at least ``min_len``."""
    item = "integers" if ints else "numbers"
    words = f"a list of {'at least ' + str(min_len) + ' ' if min_len > 1 else ''}{item}"
    if min_len == 1:
        words = f"a non-empty list of {item}"
    if lo is not None:
        words += f" {'>' if lo_open else '>='} {lo}"
    words += f" such as {example}" if example else ""

    def test(v: Any) -> bool:
        if not isinstance(v, (list, tuple)) or len(v) < min_len:
            return False
        ok = is_int if ints else is_num
        return all(ok(x) and (lo is None or (x > lo if lo_open else x >= lo)) for x in v)

    bad = (
        "abc",
        ["abc"],
        *(([lo if lo_open else lo - 1],) if lo is not None else ()),
        *(([],) if min_len else ()),
    )
    return Rule(words, test, null, bad)


class RegisteredSampler(Rule):
    """A sampler registered in :mod:`cmexp.registry` (which fit the model is checked on load),
    or null (the model's own)."""

    def __init__(self) -> None:
        super().__init__("", self._known, null=True, bad=("not-a-sampler", 5))

    @staticmethod
    def _known(v: Any) -> bool:
        from cmexp import registry

        return isinstance(v, str) and v in registry.samplers()

    def describe(self) -> str:
        from cmexp import registry

        return "one of " + ", ".join(registry.samplers()) + " or null"


DEVICE = Rule(
    "auto, cpu, cuda, cuda:N or mps",
    lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None,
    bad=("tpu", "cuda:x", 0),
)
SPLIT = OneOf("train", "test")
PRECISIONS = (
    "64-true",
    "32-true",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "transformer-engine",
    "transformer-engine-float16",
    "64",
    "32",
    "16",
    "bf16",
    64,
    32,
    16,
)
SEED = Int(0, 2**32 - 1)
FRACTION = Num(
    0, 1, hi_open=True
)  # [0, 1): dropout, EMA rates (ranges of mu/ema_decay: check_train_config)
POSITIVE = Num(0, lo_open=True)
#: A lognormal noise-level distribution's ``model.loss.P_mean``/``P_std`` (EDM, ECT, sCM).
LOGNORMAL = {"model.loss.P_mean": Num(), "model.loss.P_std": POSITIVE}


def _devices(v: Any) -> bool:
    if is_int(v):
        return v >= 1 or v == -1
    if isinstance(v, str):
        return v == "auto" or re.fullmatch(r"-?\d+(,\d+)*,?", v) is not None
    return isinstance(v, (list, tuple)) and bool(v) and all(is_int(x) and x >= 0 for x in v)


DATASET: dict[str, Rule] = {
    "dataset.batch_size": Int(1),
    "dataset.num_workers": Int(0),
    "dataset.random_flip": Bool(),
    "dataset.subset": Int(1, null=True),
    "dataset.resolution": Int(4),
    "dataset.channels": OneOf(1, 3),
    "dataset.num_classes": Int(0),
    "dataset.use_labels": Bool(),  # class-conditional training (nets' label_dim = num_classes)
    "dataset.length": Int(1),
    "dataset.num_components": Int(1),
    "dataset.std": POSITIVE,
    "dataset.mixture_seed": SEED,
}

TRAIN: dict[str, Rule] = {
    "seed": SEED,
    "global_batch_size": Int(1, null=True),
    "tags": Rule("a list of strings", lambda v: isinstance(v, (list, tuple)), null=True, bad=(5,)),
    **DATASET,
    # net (SongUNet, TinyUNet, SmallCNN)
    "net.model_channels": Int(1),
    "net.channel_mult": Numbers(lo=1, min_len=1, ints=True, example="[1, 2, 4]"),
    "net.num_blocks": Int(1),
    "net.attn_resolutions": Numbers(lo=1, ints=True, example="[16]"),
    "net.dropout": FRACTION,
    "net.embedding_type": OneOf("fourier", "positional"),
    "net.fourier_scale": POSITIVE,
    "net.noise_channels_mult": Int(1),
    "net.emb_channels_mult": Int(1),
    "net.resample_filter": Numbers(lo=0, lo_open=True, min_len=1, example="[1, 3, 3, 1]"),
    "net.progressive_input": OneOf("none", "residual"),
    "net.skip_rescale": Bool(),
    "net.init_scale": Num(0),
    "net.num_heads": Int(1),
    "net.positional_endpoint": Bool(),  # SongUNet: EDM's DDPM++ frequency spacing (cmexp.interop)
    "net.num_head_channels": Int(1, also=(-1,), note=" (-1: net.num_heads heads)"),  # ADMUNet
    "net.use_scale_shift_norm": Bool(),  # ADMUNet
    "net.resblock_updown": Bool(),  # ADMUNet
    "net.label_dim": Int(0),
    "net.guidance_embed": Bool(),  # guided CD students take w (cmexp.nets.guidance)
    "net.width": Int(1),
    "net.feature_dim": Int(1),
    # model (ranges of sigma_min/max, ema_decay: check_train_config)
    "model.optimizer.lr": POSITIVE,
    "model.optimizer.weight_decay": Num(0),
    "model.ema_decay": Num(),
    "model.lr_warmup_kimg": Num(0),
    # the preconditioning object every method builds (model.precond: a wrapper with its
    # constants; ranges of sigma_min/max: check_train_config)
    "model.precond.sigma_min": Num(),
    "model.precond.sigma_max": Num(),
    "model.precond.sigma_data": POSITIVE,
    "model.precond.c_noise_scale": POSITIVE,
    "model.rho": POSITIVE,
    "model.taus": Numbers(lo=0, lo_open=True, example="[0.585]"),
    "net.channels_last": Bool(),
    "net.convs": Numbers(lo=1, ints=True, min_len=1, example="[1, 2, 2]"),
    "model.teacher_path": Str(null=True),
    "model.optimizer.betas": Rule(
        "a list of two numbers in [0, 1) such as [0.9, 0.99]",
        lambda v: (
            isinstance(v, (list, tuple))
            and len(v) == 2
            and all(is_num(x) and 0 <= x < 1 for x in v)
        ),
        bad=("abc", [0.9], [0.9, 1.0]),
    ),
    "model.optimizer.eps": POSITIVE,
    "model.init_from_teacher": Bool(),
    "model.compile_net": Bool(),
    "model.channels_last": Bool(),
    # schedule (s1 >= s0, mu ranges: check_train_config)
    # metric
    # the groups every training config holds (used by the methods that select them)
    "schedule.s0": Int(1),  # CD/CT's N(k) curriculum (CM paper Table 3; iCT: 10 -> 1280)
    "schedule.s1": Int(1),
    "schedule.mu": Num(),  # target rate mu: [0, 1) (check_train_config)
    "schedule.mu0": Num(),
    "schedule.num_scales": Int(2),
    "schedule.variant": OneOf("code", "paper"),
    "vp_schedule.alpha_bars.num_steps": Int(2),  # model=edm_vp: the discrete VP schedule
    "vp_schedule.alpha_bars.max_beta": Num(0, 1, lo_open=True),
    "vp_schedule.alpha_bars.beta_start": Num(0, 1, lo_open=True, hi_open=True),  # DDPM: 1e-4
    "vp_schedule.alpha_bars.beta_end": Num(0, 1, lo_open=True, hi_open=True),  # DDPM: 0.02
    "vp_schedule.alpha_bars.s": Num(0),
    "vp_schedule.zero_terminal_snr": Bool(),
    "tangent.eps": Num(0, 0.1, lo_open=True),  # the finite-difference tangent (sCT/sCD, MeanFlow)
    "model.loss.metric.c": Num(0, lo_open=True, null=True),  # a loss's own distance's c
    "metric.net": OneOf("vgg", "alex", "squeeze"),
    "metric.resize": Int(16, null=True),
    "metric.c": Num(0, lo_open=True, null=True),
    # trainer (max_steps range: check_train_config)
    "trainer.accelerator": OneOf("cpu", "gpu", "cuda", "mps", "tpu", "auto"),
    "trainer.devices": Rule(
        "an integer >= 1, -1, auto, or a list of device indices", _devices, bad=(0, "abc", [])
    ),
    "trainer.num_nodes": Int(1),
    "trainer.precision": OneOf(*PRECISIONS),
    "trainer.max_steps": Int(),
    "trainer.max_epochs": Int(-1),
    "trainer.log_every_n_steps": Int(1),
    "trainer.accumulate_grad_batches": Int(1),
    "trainer.gradient_clip_val": Num(0, null=True),
    "trainer.enable_progress_bar": Bool(),
    "trainer.enable_model_summary": Bool(),
    "trainer.num_sanity_val_steps": Int(-1),
    "trainer.limit_val_batches": Num(0),
    "trainer.benchmark": Bool(null=True),
    "trainer.sync_batchnorm": Bool(),
    "trainer.fast_dev_run": Rule(
        "true, false or an integer >= 0",
        lambda v: isinstance(v, bool) or (is_int(v) and v >= 0),
        bad=(-1, "abc"),
    ),
    "trainer.strategy": Str(),
    # callbacks
    "callbacks.checkpoint.every_n_train_steps": Int(0),
    "callbacks.checkpoint.enable_version_counter": Bool(),
    "callbacks.checkpoint.save_top_k": Int(-1),
    "callbacks.checkpoint.save_last": Bool(),
    "callbacks.best_checkpoint.save_top_k": Int(-1),
    "callbacks.best_checkpoint.every_n_train_steps": Int(0),
    "callbacks.best_checkpoint.mode": OneOf("min", "max"),
    "callbacks.lr_monitor.logging_interval": OneOf("step", "epoch", null=True),
    "callbacks.sample_grid.every_n_steps": Int(0),
    "callbacks.sample_grid.num_samples": Int(1),
    "callbacks.sample_grid.seed": SEED,
    "callbacks.preemption.signals": Rule(
        "a list of signal names such as [SIGTERM, SIGUSR1]",
        lambda v: (
            isinstance(v, (list, tuple))
            and all(isinstance(s, str) and s in _signal_names() for s in v)
        ),
        bad=("SIGTERM", ["SIGFOO"]),
    ),
    "callbacks.preemption.requeue": Bool(),
    "callbacks.sample_quality.every_n_steps": Int(0),
    "callbacks.sample_quality.num_samples": Int(2),
    "callbacks.sample_quality.num_real": Int(2),
    "callbacks.sample_quality.batch_size": Int(1),
    "callbacks.sample_quality.kid_subset_size": Int(2),
    "callbacks.sample_quality.real_split": SPLIT,
    "callbacks.sample_quality.seed": SEED,
    "callbacks.sample_quality.optional": Bool(),
    # latent mode (latent=autoencoder) and its autoencoder stage (+experiment=fmnist_autoencoder)
    "latent.autoencoder_path": Str(null=True),  # required in latent mode: _check_latent
    "latent.resolution": Int(1),
    "latent.channels": Int(1),
    "latent.encode_batch_size": Int(1),
    "net.latent_channels": Int(1),
}

_INFERENCE: dict[str, Rule] = {
    "num_samples": Int(1),
    "batch_size": Int(1),
    "seed": SEED,
    "use_ema": Bool(),
    "device": DEVICE,
    "rho": Num(0, lo_open=True, null=True),
    "num_scales": Int(2, null=True),
}
_TAUS = {
    "taus": Numbers(lo=0, lo_open=True, example="[0.585]", null=True),
    "sampler": RegisteredSampler(),
    "eta": Num(0),
    "s_churn": Num(0),
    "s_tmin": Num(0),
    "s_tmax": Rule(
        "a number >= 0 (.inf: no upper bound)",
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
        bad=("abc", -1),
    ),
    "s_noise": Num(0, lo_open=True),
    "clip_denoised": Bool(null=True),
}
_FEATURES = {"features.name": Str(empty=True), "features.weights_path": Str(null=True)}
#: Class-conditional sampling (cmexp.sample / cmexp.eval): labels and the guidance scale w.
_CONDITIONAL = {
    "class_labels": Numbers(lo=0, ints=True, min_len=1, example="[3, 7]", null=True),
    "guidance": Num(0, null=True),
}

SCHEMAS: dict[str, dict[str, Rule]] = {
    "train": TRAIN,
    "sample": {
        **_INFERENCE,
        **_TAUS,
        **_CONDITIONAL,
        "grid_size": Int(1),
        "steps": Int(1),
        "tau_indices": Numbers(lo=1, ints=True, example="[11]", null=True),
        "solver_steps": Int(1, null=True),
    },
    "eval": {
        **_INFERENCE,
        **_TAUS,
        **_FEATURES,
        **DATASET,
        **_CONDITIONAL,
        "num_samples": Int(2),
        "steps": Rule(
            "an integer >= 1 or a non-empty list of them such as [1, 2]",
            lambda v: (
                (is_int(v) and v >= 1)
                or (
                    isinstance(v, (list, tuple))
                    and bool(v)
                    and all(is_int(k) and k >= 1 for k in v)
                )
            ),
            bad=("abc", 0, [], [0], [1.5]),
        ),
        "num_real": Int(2),
        "real_split": SPLIT,
        "grid_size": Int(1),
        "kid_subset_size": Int(2),
        "cache_dir": Str(),
        "reference": Str(null=True),
        "solver_steps": Numbers(lo=1, ints=True, min_len=1, example="[1, 2, 4]", null=True),
    },
    "edit": {
        **_INFERENCE,
        "real_split": SPLIT,
        "images_dir": Str(null=True),
        "data_dir": Str(null=True),
        "metric.weights_path": Str(null=True),
        "task.mask": Str(),
        "task.sigmas": Numbers(lo=0, lo_open=True, min_len=1, example="[5.38, 2.24]", null=True),
        "task.mask_size": Int(1, null=True),
        "task.num_boxes": Int(1),
        "task.num_scales": Int(2),
        "task.factor": Int(1),
        "task.levels": Int(2),
        "task.sigma": POSITIVE,
        "task.num": Int(2),
    },
    "tau_search": {
        **_INFERENCE,
        **_FEATURES,
        "steps": Int(2, note=" (there is no tau to search for 1 step)"),
        "num_samples": Int(2),
        "num_real": Int(2),
        "num_scales": Int(3, null=True),
        "real_split": SPLIT,
        "data_dir": Str(null=True),
        "cache_dir": Str(),
        "clip_denoised": Bool(null=True),
    },
    "export": {
        "ckpt": Str(null=True),  # required: checked after the values (names the key and the file)
        "format": OneOf("slim", "zoo", "diffusers"),
        "out": Str(null=True),  # slim: a new file; diffusers: a new or empty folder
        "name": Str(null=True),  # zoo
        "description": Str(null=True),
        "scores": Rule(
            "a mapping of score names to numbers such as {fd_fmnist_2step: 3.1}",  # zoo
            lambda v: isinstance(v, dict) and all(is_num(x) for x in v.values()),
            bad=("abc", {"fd": "x"}),
        ),
        "replace": Bool(),
        "use_ema": Bool(),
    },
}

#: Keys of the composed configs that hold numbers or booleans but are not user settings (the
#: schema coverage test skips them).
NOT_SETTINGS = {"_partial_", "auto_insert_metric_name", "save_last", "log_model"}


def _signal_names() -> set[str]:
    import signal

    return {s.name for s in signal.Signals}


# ------------------------------------------------------------------------------ config access
_ABSENT = object()


def _node(cfg: DictConfig, key: str) -> tuple[Any, bool]:
    """``(value, is_interpolation)`` of ``key``, ``_ABSENT`` when not in the config, None for
    a missing (``???``) value. Interpolations are resolved (None when they cannot be)."""
    parent_key, _, leaf = key.rpartition(".")
    try:
        parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    except Exception:  # noqa: BLE001 - an unresolvable parent: nothing to check here
        return _ABSENT, False
    if not isinstance(parent, DictConfig) or leaf not in parent.keys():  # noqa: SIM118 - keys() lists ??? values too
        return _ABSENT, False
    if OmegaConf.is_missing(parent, leaf):
        return None, False
    interp = OmegaConf.is_interpolation(parent, leaf)
    try:
        value = parent[leaf]
    except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra run
        return None, interp
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return value, interp


def sel(cfg: DictConfig, key: str):
    value, _ = _node(cfg, key)
    return None if value is _ABSENT else value


def present(cfg: DictConfig, key: str) -> bool:
    return _node(cfg, key)[0] is not _ABSENT


def target_of(cfg: DictConfig, group: str) -> str:
    return str(sel(cfg, f"{group}._target_") or "")


def apply_schema(cfg: DictConfig, schema: dict[str, Rule]) -> None:
    """Check every key of ``schema`` present in ``cfg`` (interpolated values are checked where
    they are set)."""
    for key, rule in schema.items():
        value, interp = _node(cfg, key)
        if value is _ABSENT or interp:
            continue
        rule.check(key, value)


# ------------------------------------------------------------------------------ files
CHECKPOINT_HINT = "a .ckpt written by cmexp.train"


def check_checkpoint_file(value: Any, key: str, what: str = CHECKPOINT_HINT) -> None:
    """A checkpoint named by ``key``: the file exists and is a complete PyTorch archive (empty,
    truncated and non-PyTorch files are named here, without loading torch). ``zoo:NAME``
    sources are checked against the zoo registry (name, file, hash)."""
    text = str(value)
    if text.startswith("zoo:"):  # a shipped model: known name, file present, SHA-256 as registered
        from cmexp import zoo

        try:
            zoo.resolve(text, key=key)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from None
        return
    path = Path(text).expanduser()
    if path.is_dir():
        raise ConfigError(f"{key}={value} is a folder; expected {what}")
    if not path.is_file():
        raise ConfigError(f"{key}={value}: no such checkpoint file")
    sniff_archive(path, key, value, what, "checkpoint")


def sniff_archive(path: Path, key: str, value: Any, what: str, noun: str) -> None:
    """Empty, truncated or foreign files named by ``key`` (PyTorch checkpoints and ``.npz``
    files are zip archives; legacy PyTorch files are pickles)."""
    if path.stat().st_size == 0:
        raise ConfigError(f"{key}={value} is an empty file; expected {what}")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            raise ConfigError(
                f"{key}={value} is a truncated or corrupt {noun} (an incomplete zip archive); "
                f"expected {what}"
            ) from None
        return
    if noun == "checkpoint" and head[:1] == b"\x80":  # a legacy (pickle) torch.save file
        return
    if noun == "checkpoint" and head[:1] and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return  # a msgpack map: a Flax checkpoint (cmexp.interop.flax_cifar10 reads and checks it)
    raise ConfigError(
        f"{key}={value} is not a {'PyTorch checkpoint' if noun == 'checkpoint' else noun} "
        f"(not a zip archive); expected {what}"
    )


def check_folder(value: Any, key: str, images: bool = False) -> Path:
    """A folder named by ``key`` exists (and holds images, with ``images``)."""
    path = Path(str(value)).expanduser()
    if path.is_file():
        raise ConfigError(
            f"{key}={value} is a file; expected a folder{' of images' if images else ''}"
        )
    if not path.is_dir():
        raise ConfigError(f"{key}={value}: no such folder{' of images' if images else ''}")
    if images and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
        raise ConfigError(
            f"{key}={value}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder"
        )
    return path


def check_file_or_folder(value: Any, key: str, what: str) -> None:
    if value is not None and not Path(str(value)).expanduser().exists():
        raise ConfigError(f"{key}={value}: no such file or folder (expected {what})")


# ------------------------------------------------------------------------------ per entry point
def check_config(entry: str, cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first bad value of a composed ``cmexp.<entry>`` config:
    the schema, the checks between keys, and the files it names."""
    if entry == "train":
        check_train_config(cfg)
        return
    apply_schema(cfg, SCHEMAS[entry])
    if entry in ("sample", "edit", "tau_search"):
        _required_checkpoint(cfg, "ckpt")
    if entry == "eval":
        ckpt, samples = sel(cfg, "ckpt"), sel(cfg, "samples")
        if bool(ckpt) == bool(samples):
            raise ConfigError(
                "give exactly one of ckpt=PATH (sample and score) or samples=PATH (score a file)"
            )
        if ckpt:
            check_checkpoint_file(ckpt, "ckpt")
        else:
            _check_samples(samples)
            if not sel(cfg, "reference"):
                _check_dataset(cfg)
    if entry in ("eval", "tau_search"):
        _check_features(cfg, "features")
    if entry == "edit":
        if sel(cfg, "images_dir"):
            check_folder(sel(cfg, "images_dir"), "images_dir", images=True)
        if sel(cfg, "data_dir"):
            check_folder(sel(cfg, "data_dir"), "data_dir")
        check_file_or_folder(
            sel(cfg, "metric.weights_path"),
            "metric.weights_path",
            "the VGG16 file vgg16-397923af.pth or its folder",
        )
        _check_task(cfg)
    if entry == "tau_search" and sel(cfg, "data_dir"):
        check_folder(sel(cfg, "data_dir"), "data_dir")
    if entry == "export":
        _required_checkpoint(cfg, "ckpt")
        _check_export_out(cfg)


def _required_checkpoint(cfg: DictConfig, key: str) -> None:
    value = sel(cfg, key)
    if not value:
        raise ConfigError(
            f"{key} is required: {key}=/path/to/last.ckpt of a cmexp.train run (or zoo:NAME)"
        )
    check_checkpoint_file(value, key)


def _check_export_out(cfg: DictConfig) -> None:
    """``format=slim`` writes a new file at ``out``; ``format=diffusers`` a folder: required,
    and new or empty. Nothing that exists is overwritten."""
    if sel(cfg, "format") == "slim":
        out = sel(cfg, "out")
        if not out:
            raise ConfigError("format=slim needs out=/path/to/file.pt (a new file)")
        path = Path(str(out)).expanduser()
        if path.exists():
            what = "a folder" if path.is_dir() else "a file that exists"
            raise ConfigError(
                f"out={out} is {what}; refusing to overwrite it: give a new file name "
                "(or remove it first)"
            )
        return
    if sel(cfg, "format") != "diffusers":
        return
    out = sel(cfg, "out")
    if not out:
        raise ConfigError(
            "format=diffusers needs out=DIR (a new or empty folder for the pipeline)"
        )
    path = Path(str(out)).expanduser()
    if path.is_file():
        raise ConfigError(
            f"out={out} is a file; format=diffusers writes a folder (give a new or empty one)"
        )
    if path.is_dir() and any(path.iterdir()):
        shown = ", ".join(sorted(p.name for p in path.iterdir())[:3])
        raise ConfigError(
            f"out={out} is a folder that is not empty ({shown}); refusing to overwrite it: "
            "give a new or empty folder"
        )


def _check_samples(value: Any) -> None:
    path = Path(str(value)).expanduser()
    what = "an .npz file (arr_0: uint8 [N,H,W,C]) or a folder of PNG/JPG images"
    if path.is_dir():
        if not any(p.suffix.lower() in (".png", ".jpg", ".jpeg") for p in path.iterdir()):
            raise ConfigError(f"samples={value}: no PNG/JPG images in the folder")
        return
    if not path.is_file():
        raise ConfigError(f"samples={value}: no such file or folder (expected {what})")
    if path.suffix != ".npz":
        raise ConfigError(f"samples={value} is not an .npz file; expected {what}")
    sniff_archive(path, "samples", value, what, ".npz file")


def _check_features(cfg: DictConfig, prefix: str, optional: bool = False) -> None:
    """The feature extractor of eval / tau_search / in-training quality: a classifier needs its
    checkpoint, Inception's weights file must exist when given."""
    target = target_of(cfg, prefix)
    if target.endswith("ClassifierFeatures"):
        value, interp = _node(cfg, f"{prefix}.ckpt")
        value = None if value is _ABSENT else value
        if optional and (
            interp or value
        ):  # quality=fmnist_auto: skipped with a warning when absent
            return
        if not value:
            raise ConfigError(
                f"{prefix}.ckpt is required by the feature classifier: {prefix}.ckpt=<run>/checkpoints/last.ckpt "
                "of `python -m cmexp.train +experiment=fmnist_classifier` (or features=inception for RGB data)"
            )
        check_checkpoint_file(value, f"{prefix}.ckpt", "a .ckpt of +experiment=fmnist_classifier")
    elif target.endswith("InceptionFeatures"):
        check_file_or_folder(
            sel(cfg, f"{prefix}.weights_path"),
            f"{prefix}.weights_path",
            "weights-inception-2015-12-05-6726825d.pth or its folder",
        )


def _check_dataset(cfg: DictConfig) -> None:
    """An image folder dataset needs an existing folder with images."""
    if not present(cfg, "dataset._target_"):
        return
    if target_of(cfg, "dataset").endswith("ImageFolderDataModule"):
        value = sel(cfg, "dataset.data_dir")
        if not value:
            raise ConfigError(
                "dataset.data_dir is required for dataset=imagefolder: dataset.data_dir=/path/to/images"
            )
        check_folder(value, "dataset.data_dir", images=True)
    if target_of(cfg, "dataset").endswith(
        "ImageNet64DataModule"
    ):  # npz files or class folders of images
        value = sel(cfg, "dataset.data_dir")
        folder = check_folder(value, "dataset.data_dir") if value else None
        if (
            folder
            and not any(folder.glob("*.npz"))
            and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*"))
        ):
            raise ConfigError(
                f"dataset.data_dir={value}: neither downsampled-ImageNet npz files (Imagenet64_train_part1.npz, ...) "
                "nor images in the folder"
            )
    res, channel_mult = sel(cfg, "dataset.resolution"), sel(cfg, "net.channel_mult")
    net = target_of(cfg, "net")
    if net.endswith(("SongUNet", "ADMUNet")) and is_int(res) and channel_mult:
        step = 2 ** (len(channel_mult) - 1)
        if res % step:
            raise ConfigError(
                f"dataset.resolution={res} must be divisible by {step} for net.channel_mult={channel_mult} "
                f"(the net halves it {len(channel_mult) - 1} times)"
            )
    if net.endswith("TinyUNet") and is_int(res) and res % 2:
        raise ConfigError(f"dataset.resolution={res} must be even for net=tiny")


def _check_net(cfg: DictConfig) -> None:
    if target_of(cfg, "net").endswith("ADMUNet"):
        nf, mults, head = (
            sel(cfg, "net.model_channels"),
            sel(cfg, "net.channel_mult") or [],
            sel(cfg, "net.num_head_channels"),
        )
        if is_int(nf) and is_int(head) and head > 0 and any((nf * m) % head for m in mults):
            raise ConfigError(
                f"net.num_head_channels={head} must divide every width net.model_channels x "
                f"net.channel_mult = {[nf * m for m in mults]}"
            )
        return
    if not target_of(cfg, "net").endswith("SongUNet"):
        return
    nf, mults = sel(cfg, "net.model_channels"), sel(cfg, "net.channel_mult") or []
    noise, heads = sel(cfg, "net.noise_channels_mult"), sel(cfg, "net.num_heads")
    if is_int(nf) and is_int(noise) and (nf * noise) % 2:
        raise ConfigError(
            f"net.model_channels x net.noise_channels_mult = {nf} x {noise} must be even "
            f"(the width of the {sel(cfg, 'net.embedding_type')} noise embedding)"
        )
    if is_int(nf) and is_int(heads) and any((nf * m) % heads for m in mults):
        raise ConfigError(
            f"net.num_heads={heads} must divide every attention width net.model_channels x "
            f"net.channel_mult = {[nf * m for m in mults]}"
        )


def _check_task(cfg: DictConfig) -> None:
    target = target_of(cfg, "task")
    if target.endswith("Stroke") and sel(cfg, "task.sigmas") is None:
        raise ConfigError(
            "task.sigmas must be a non-empty list of numbers > 0 such as [5.38, 2.24] for task=stroke, got null"
        )
    mask = sel(cfg, "task.mask")
    if target.endswith("Inpaint") and mask not in (None, "center", "boxes"):
        path = Path(str(mask)).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"task.mask={mask}: no such mask image (expected center, boxes or a PNG, white = fill)"
            )


def check_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first bad value of a training config."""
    apply_schema(cfg, TRAIN)
    method = method_of(cfg)
    if method is not None:
        apply_schema(cfg, method.schema)
    s0, s1 = sel(cfg, "schedule.s0"), sel(cfg, "schedule.s1")
    if s0 is not None and s1 is not None and s1 < s0:
        raise ConfigError(f"schedule.s1={s1} must be >= schedule.s0={s0}")
    for key in ("schedule.mu", "schedule.mu0"):
        mu = sel(cfg, key)
        if mu is not None and not 0 <= mu < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {mu}")
    smin, smax = sel(cfg, "model.precond.sigma_min"), sel(cfg, "model.precond.sigma_max")
    if smin is not None and smax is not None:
        if not smin > 0:
            raise ConfigError(f"model.precond.sigma_min must be > 0, got {smin}")
        if not smin < smax:
            raise ConfigError(
                f"model.precond.sigma_min={smin} must be < model.precond.sigma_max={smax}"
            )
    ema = sel(cfg, "model.ema_decay")
    if ema is not None and not 0 <= ema < 1:
        raise ConfigError(f"model.ema_decay must be in [0, 1), got {ema}")
    if method is not None and method.teacher:
        _check_teacher(cfg, method.teacher)
    check_conditional(cfg)
    max_steps = sel(cfg, "trainer.max_steps")
    if max_steps is not None and max_steps != -1 and max_steps < 1:
        raise ConfigError(f"trainer.max_steps must be >= 1, got {max_steps}")
    if method is not None and method.rules is not None:
        method.rules(cfg)
    _check_dataset(cfg)
    _check_net(cfg)
    _check_latent(cfg)
    if present(cfg, "metric.weights_path"):
        check_file_or_folder(
            sel(cfg, "metric.weights_path"),
            "metric.weights_path",
            "the backbone file, e.g. vgg16-397923af.pth, or its folder",
        )
    if present(cfg, "callbacks.sample_quality._target_"):
        _check_features(
            cfg,
            "callbacks.sample_quality.features",
            optional=bool(sel(cfg, "callbacks.sample_quality.optional")),
        )
    accumulation_steps(cfg)  # global_batch_size fits the devices
    ckpt = sel(cfg, "ckpt_path")
    if ckpt and str(ckpt) not in ("auto", "last"):
        path = Path(str(ckpt)).expanduser()
        if not path.exists():
            raise ConfigError(
                f"ckpt_path={ckpt}: no such file (or ckpt_path=auto: the newest readable checkpoint of the run)"
            )
        check_checkpoint_file(
            ckpt,
            "ckpt_path",
            "a checkpoint of this experiment's runs (<run>/checkpoints/last.ckpt)",
        )


def check_conditional(cfg: DictConfig) -> None:
    """Class-conditional training needs labelled data."""
    use_labels, classes = sel(cfg, "dataset.use_labels"), sel(cfg, "dataset.num_classes")
    if use_labels is True and classes == 0:
        raise ConfigError(
            "dataset.use_labels=true but dataset.num_classes=0: this dataset has no class labels "
            "(dataset=imagefolder: one subfolder per class and dataset.num_classes=<their count>)"
        )


def method_of(cfg: DictConfig) -> Any:
    """The registered method (:class:`cmexp.registry.Method`) of the config's
    ``model._target_``, or None (no model, or a LightningModule no method registered)."""
    from cmexp import registry

    target = target_of(cfg, "model")
    return registry.method_for_target(target) if target else None


def train_schema() -> dict[str, Rule]:
    """Every value rule of a training config: the generic ones and every registered
    method's (a method's own keys are checked only when that method is selected)."""
    from cmexp import registry

    out = dict(TRAIN)
    for m in registry.methods().values():
        out.update(m.schema)
    return out


def _check_teacher(cfg: DictConfig, what: str) -> None:
    """A method that starts from a teacher (``Method.teacher``) needs ``model.teacher_path``."""
    path = sel(cfg, "model.teacher_path")
    if not path:
        raise ConfigError(
            f"model.teacher_path is required for {what}: set "
            "model.teacher_path=/path/to/last.ckpt of an EDM run (e.g. +experiment=fmnist_edm), "
            "or model.teacher_path=zoo:fmnist_edm (the shipped Fashion-MNIST teacher)"
        )
    check_checkpoint_file(
        path, "model.teacher_path", "the last.ckpt of an EDM run (+experiment=fmnist_edm)"
    )


def _check_latent(cfg: DictConfig) -> None:
    """Latent mode (``latent=autoencoder``): the autoencoder checkpoint exists, and the latent
    side fits the net's downsampling (its shape is checked against the checkpoint on load)."""
    if sel(cfg, "latent") is None:
        return
    path = sel(cfg, "latent.autoencoder_path")
    if not path:
        raise ConfigError(
            "latent.autoencoder_path is required in latent mode: latent.autoencoder_path=<run>/checkpoints/"
            "last.ckpt of +experiment=fmnist_autoencoder (or latent=none for pixel space)"
        )
    check_checkpoint_file(
        path, "latent.autoencoder_path", "the last.ckpt of +experiment=fmnist_autoencoder"
    )
    res, channel_mult = sel(cfg, "latent.resolution"), sel(cfg, "net.channel_mult")
    if target_of(cfg, "net").endswith(("SongUNet", "ADMUNet")) and is_int(res) and channel_mult:
        step = 2 ** (len(channel_mult) - 1)
        if res % step:
            raise ConfigError(
                f"latent.resolution={res} must be divisible by {step} for net.channel_mult={channel_mult} "
                f"(the net halves it {len(channel_mult) - 1} times)"
            )


def accumulation_steps(cfg: DictConfig) -> int:
    """Gradient-accumulation steps that keep ``global_batch_size`` (512 for CIFAR-10, CM
    Table 3) whatever the device count: ``global / (dataset.batch_size x trainer.devices x
    trainer.num_nodes)``. Without ``global_batch_size``, ``trainer.accumulate_grad_batches``."""
    total = sel(cfg, "global_batch_size")
    if not total:
        return int(sel(cfg, "trainer.accumulate_grad_batches") or 1)
    batch, devices, nodes = (
        sel(cfg, "dataset.batch_size"),
        sel(cfg, "trainer.devices"),
        sel(cfg, "trainer.num_nodes") or 1,
    )
    if not isinstance(devices, int):
        raise ConfigError(
            f"global_batch_size={total} needs an integer trainer.devices, got {devices!r}"
        )
    per_step = int(batch) * devices * int(nodes)
    if total % per_step:
        raise ConfigError(
            f"global_batch_size={total} must be a multiple of dataset.batch_size={batch} x trainer.devices={devices} "
            f"x trainer.num_nodes={nodes} = {per_step}; e.g. dataset.batch_size={max(1, total // (devices * int(nodes)))}"
        )
    return total // per_step
