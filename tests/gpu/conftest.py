"""The CUDA test set (``pytest -m gpu tests/gpu``): skipped where no CUDA device is visible, and
never in the default selection (``-m 'not slow and not gpu'``). Each module sets
``pytestmark = pytest.mark.gpu`` (pytest ignores a pytestmark in a conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _skip_reason() -> str | None:
    from tests.gpu.helpers import ON_CPU

    if ON_CPU or torch.cuda.is_available():
        return None
    return "needs a CUDA device (torch.cuda.is_available() is False); run on a GPU machine"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    if reason is None:
        return
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """W&B side files in the test's temporary folder; TF32 as cmexp.train leaves it."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(base / var.lower()))


@pytest.fixture(scope="session")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EDM teacher checkpoint (tiny UNet, 2 CPU steps) for CD, ECT, sCD and PD."""
    from tests.gpu.helpers import teacher_checkpoint

    return teacher_checkpoint(tmp_path_factory.mktemp("teacher"))
