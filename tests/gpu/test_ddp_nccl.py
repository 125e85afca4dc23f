"""DDP with the NCCL backend on the CUDA devices available (one is enough: it runs the
distributed code path -- process group, DDP wrapper, gradient all-reduce, rank-0 checkpoints)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.gpu import helpers as H

pytestmark = pytest.mark.gpu


def test_ddp_nccl_trains_on_every_device_and_keeps_ranks_identical(tmp_path: Path) -> None:
    """``python -m cmexp.train trainer=ddp`` (plain ``ddp``: inside pytest it would re-run
    pytest for rank 1, so it runs as the command line does) with all visible devices."""
    n = torch.cuda.device_count() if not H.ON_CPU else 1
    record = tmp_path / "record"
    cmd = [
        sys.executable,
        "-m",
        "cmexp.train",
        f"+experiment={H.METHODS['ct']}",
        *H.TINY,
        "trainer=ddp",
        f"trainer.accelerator={'cpu' if H.ON_CPU else 'gpu'}",
        f"trainer.devices={n}",
        "trainer.max_steps=2",
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "+callbacks.record._target_=tests.gpu.helpers.StepRecorder",
        f"+callbacks.record.path={record}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        cmd, cwd=H.ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [torch.load(f"{record}.rank{r}.pt", weights_only=False) for r in range(n)]
    for r, rep in enumerate(reports):
        assert rep["backend"] == ("gloo" if H.ON_CPU else "nccl"), rep["backend"]
        assert rep["world_size"] == n and len(rep["losses"]) == 2
        assert all(torch.isfinite(torch.tensor(rep["losses"]))) and H.all_finite(rep["end"])
        assert H.rel_err(rep["end"], reports[0]["end"]) == 0.0, f"rank {r} differs from rank 0"
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
