"""Fixtures for Hydra-composed runs: compose the real conf/ tree, point every output at tmp."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
#: a training without a teacher (the main job distils the zoo teacher, which debug=tiny cannot shrink)
CT_EXPERIMENT = "+experiment=fmnist_ct_pseudo_huber"

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration `integration` (a conftest's `pytestmark` is
    ignored by pytest, so `-m integration` selected nothing)."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _isolated_env(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(base / var.lower()))


def compose_train(overrides: list[str], out: Path, config_name: str = "train") -> DictConfig:
    """Compose conf/<config_name>.yaml like `python -m cmexp.<config_name>` would, with outputs
    under ``out``."""
    if (
        config_name == "train"
    ):  # the order cmexp.train applies them in (no main-job experiment here)
        from cmexp.train import train_overrides

        overrides = train_overrides(overrides, main_experiment=False)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.runtime.cwd = str(out.parent)
        cfg.hydra.job.override_dirname = ",".join(
            o for o in overrides if not o.startswith("+experiment")
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(out.parent)
        cfg.paths.output_dir = str(out)
        del cfg["hydra"]
    return cfg


@pytest.fixture
def composer(tmp_path: Path) -> Callable[..., DictConfig]:
    counter = iter(range(1000))

    def make(overrides: list[str], name: str | None = None) -> DictConfig:
        return compose_train(overrides, tmp_path / (name or f"run{next(counter)}"))

    yield make
    GlobalHydra.instance().clear()


@contextmanager
def raises_wrapped_value_error(match: str) -> Iterator[pytest.ExceptionInfo]:
    """A module constructor's ValueError, as training raises it: Hydra wraps it in an
    InstantiationException and the command line prints its cause (``cmexp.utils.cli.user_error``):
    that cause must be a plain ValueError whose message matches ``match`` (a regex)."""
    from hydra.errors import InstantiationException

    from cmexp.utils.cli import user_error

    with pytest.raises(InstantiationException) as info:
        yield info
    cause = user_error(info.value)
    assert type(cause) is ValueError, f"not a ValueError: {cause!r}"
    assert re.search(match, str(cause)), f"{match!r} not found in {cause}"


#: One process of 8 images, and two ddp_fork processes of 4: the same global batch.
SINGLE_AND_DDP = (
    ("single", ["dataset.batch_size=8"]),
    ("ddp", ["dataset.batch_size=4", "trainer.devices=2", "+trainer.strategy=ddp_fork"]),
)


def train_single_and_ddp(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overrides: list[str],
    report: Callable[[Path], object],
) -> dict[str, tuple[Path, Path]]:
    """Train ``overrides`` once as one process of 8 images and once as two ``ddp_fork``
    processes of 4 (:data:`SINGLE_AND_DDP`), each trainer with the callback ``report(folder)``
    appended (it writes what the test compares into ``folder``). Returns ``{"single": (report
    folder, run folder), "ddp": (...)}``."""
    import hydra
    import lightning.pytorch as pl

    from cmexp.train import train

    out = {}
    for name, extra in SINGLE_AND_DDP:
        folder = tmp_path / f"rep_{name}"
        folder.mkdir()
        callback = report(folder)
        orig = hydra.utils.instantiate

        def with_report(node, *args, _orig=orig, _cb=callback, **kwargs):
            obj = _orig(node, *args, **kwargs)
            if isinstance(obj, pl.Trainer):
                obj.callbacks.append(_cb)
            return obj

        with monkeypatch.context() as m:
            m.setattr(hydra.utils, "instantiate", with_report)
            train(compose_train([*overrides, *extra], tmp_path / name))
        out[name] = (folder, tmp_path / name)
    return out


def logged_losses(run: Path) -> list[float]:
    """``train/loss`` of every logged step of a run (its csv/metrics.csv), in order."""
    import csv

    with open(run / "csv" / "metrics.csv") as fh:
        return [float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")]


def fake_inception_weights(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """torch-fidelity's Inception-v3 weights file name and layout with random values."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    from cmexp.metrics import InceptionFeatures

    with monkeypatch.context() as m:
        m.setattr(fi.torch, "load", lambda *a, **k: None)
        m.setattr(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        state = fi.FeatureExtractorInceptionV3(
            "x", ["2048"], feature_extractor_weights_path="unused"
        ).state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / InceptionFeatures.FILE)
    return folder
