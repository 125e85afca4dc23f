"""Preemption-safe training: a signal saves a checkpoint at the next step boundary and the
resumed run continues the uninterrupted one bit for bit; checkpoint writes are atomic and
``ckpt_path=auto`` finds the newest readable checkpoint."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cmexp.train import train
from cmexp.utils.checkpoint_io import atomic_torch_save, find_resume_checkpoint

TINY = ["debug=tiny"]
ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    *TINY,
    "model=ct",
    "schedule=adaptive",
    "trainer.max_steps=8",
    "dataset.length=40",
    "callbacks.checkpoint.every_n_train_steps=100",
]


def _losses(run: Path) -> dict[int, str]:
    with open(run / "csv" / "metrics.csv") as fh:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(fh) if r.get("train/loss")}


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_at_a_random_step_saves_and_the_resumed_run_is_bit_exact(composer, signum) -> None:
    step = random.Random(int(signum)).randrange(1, 6)
    full = composer(COMMON, name="a_full")
    train(full)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    cut = composer(
        [
            *COMMON,
            "+callbacks.signal._target_=tests.fakes.SignalAtStep",
            f"+callbacks.signal.step={step}",
            f"+callbacks.signal.signum={int(signum)}",
        ],
        name="b_cut",
    )
    out = train(cut)
    stop = out["preempted"]
    assert (
        stop is not None
        and stop.exit_code == 128 + int(signum)
        and out["trainer"].global_step == step + 1
    )
    assert stop.ckpt == Path(cut.paths.output_dir) / "checkpoints" / "last.ckpt"
    # the run's handlers are gone: each signal has the handler it had before the run
    assert {s: signal.getsignal(s) for s in before} == before
    resumed = composer([*COMMON, "ckpt_path=auto"], name="c_resumed")  # finds b_cut's last.ckpt
    assert train(resumed)["trainer"].global_step == 8
    a, b, c = (_losses(Path(x.paths.output_dir)) for x in (full, cut, resumed))
    assert sorted(b) == list(range(step + 1)) and sorted(c) == list(range(step + 1, 8))
    assert {**b, **c} == a  # every logged loss, as written (bit for bit)
    wa = _weights(Path(full.paths.output_dir) / "checkpoints" / "last.ckpt")
    wc = _weights(Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert wa.keys() == wc.keys() and all(torch.equal(wa[k], wc[k]) for k in wa)


def test_sigterm_from_outside_exits_non_zero_with_the_resume_command(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "cmexp.train",
        "+experiment=fmnist_ct_pseudo_huber",
        "debug=tiny",
        "model=ct",
        "trainer.max_steps=100000",
        "quality=none",
        f"hydra.run.dir={run}",
        f"paths.root_dir={tmp_path}",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "CMEXP_OFFLINE": "1"},
    )
    metrics = run / "csv" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.stat().st_size > 0):
        time.sleep(0.2)  # training has logged its first steps
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert (
        "SIGTERM received at step" in out
        and f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in out
    )
    assert find_resume_checkpoint([run], "ct") == run / "checkpoints" / "last.ckpt"


def test_interrupted_write_keeps_the_previous_file_and_auto_skips_bad_ones(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    ckpt_dir = tmp_path / "run" / "checkpoints"
    good = {"state_dict": {"w": torch.ones(3)}, "optimizer_states": [], "cmexp": {"kind": "ct"}}
    atomic_torch_save(good, ckpt_dir / "last.ckpt")
    old = (ckpt_dir / "last.ckpt").read_bytes()

    def dies_half_way(obj, fh) -> None:
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process is killed while writing

    with monkeypatch.context() as m:
        m.setattr(torch, "save", dies_half_way)
        with pytest.raises(KeyboardInterrupt):
            atomic_torch_save({"new": 1}, ckpt_dir / "last.ckpt")
    assert (ckpt_dir / "last.ckpt").read_bytes() == old  # the complete previous file is kept
    assert [p.name for p in ckpt_dir.iterdir()] == ["last.ckpt"]  # no temp file left behind
    # a SIGKILL leaves its temp file: the next start removes it; unreadable files are skipped by name
    (ckpt_dir / ".last.ckpt.tmp-999").write_bytes(b"partial")
    time.sleep(0.01)
    (ckpt_dir / "step0000009.ckpt").write_bytes(b"truncated")
    with caplog.at_level("WARNING"):
        assert find_resume_checkpoint([tmp_path / "run"], "ct") == ckpt_dir / "last.ckpt"
    assert not (ckpt_dir / ".last.ckpt.tmp-999").exists()
    assert "skipping" in caplog.text and "step0000009.ckpt: unreadable" in caplog.text
    assert find_resume_checkpoint([tmp_path / "run"], "edm") is None  # another kind is not resumed


def test_auto_and_last_without_any_checkpoint(tmp_path: Path) -> None:
    from cmexp.utils.checks import ConfigError

    from .conftest import compose_train

    out = train(
        compose_train(
            [*COMMON, "trainer.max_steps=2", "ckpt_path=auto"], tmp_path / "a" / "runs" / "one"
        )
    )
    assert out["trainer"].global_step == 2  # nothing to resume: started afresh
    with pytest.raises(ConfigError, match="ckpt_path=last: no readable checkpoint"):
        train(compose_train([*COMMON, "ckpt_path=last"], tmp_path / "b" / "runs" / "one"))


def test_sigterm_to_the_launching_process_of_ddp_fork_ranks_saves_and_exits_143(
    tmp_path: Path,
) -> None:
    """With ddp_fork both ranks are child processes: SIGTERM to the process the user started
    is passed on to them (not orphaning them mid-step); they save last.ckpt at a step boundary
    and the command exits with 143 and the resume line."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "cmexp.train",
        "+experiment=fmnist_ct_pseudo_huber",
        "debug=tiny",
        "model=ct",
        "trainer.max_steps=100000",
        "quality=none",
        "trainer.devices=2",
        "+trainer.strategy=ddp_fork",
        f"hydra.run.dir={run}",
        f"paths.root_dir={tmp_path}",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "CMEXP_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    metrics = run / "csv" / "metrics.csv"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.is_file() and metrics.stat().st_size > 0):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "SIGTERM received at step" in out and "Traceback" not in out
    ckpt = run / "checkpoints" / "last.ckpt"
    assert find_resume_checkpoint([run], "ct") == ckpt
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] >= 1
