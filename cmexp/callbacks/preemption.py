"""Preemption: SIGTERM / SIGINT / SIGUSR1 save a full checkpoint at the next optimizer-step
boundary and stop the run with a non-zero exit code (or requeue the SLURM job)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl

log = logging.getLogger(__name__)


MARKER = ".preempted.json"  # in the checkpoint folder: how a spawned/forked rank tells the parent


class TrainingPreempted(Exception):
    """Raised after the preemption checkpoint is written; ``exit_code`` = 128 + signal number
    (the shell's convention for "terminated by a signal", never 0)."""

    def __init__(self, signum: int, ckpt: Path, requeued: bool = False) -> None:
        self.signum, self.ckpt, self.requeued = int(signum), Path(ckpt), bool(requeued)
        name = signal.Signals(self.signum).name
        super().__init__(
            f"{name} received: saved {self.ckpt}"
            + (" and requeued the SLURM job" if requeued else "")
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def write_marker(self, dirpath: Path) -> None:
        """Record the stop for the launching process (``ddp_spawn``/``ddp_fork`` run the fit in
        child processes, whose exceptions reach the parent only as text)."""
        import json

        (Path(dirpath) / MARKER).write_text(
            json.dumps({"signum": self.signum, "ckpt": str(self.ckpt), "requeued": self.requeued})
        )

    @classmethod
    def from_marker(cls, dirpath: Path) -> TrainingPreempted | None:
        """The stop a child rank recorded in ``dirpath`` (the marker is removed), or None."""
        import json

        path = Path(dirpath) / MARKER
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        path.unlink()
        return cls(int(data["signum"]), Path(data["ckpt"]), bool(data.get("requeued", False)))


class PreemptionCallback(pl.Callback):
    """Turns the scheduler's signals into a checkpoint and a clean stop.

    The handlers only set a flag; at the end of the batch that completes the current optimizer
    step, every rank agrees (any rank signalled -> all save), ``dirpath/last.ckpt`` is written
    atomically (``AtomicCheckpointIO``), and :class:`TrainingPreempted` stops the run before
    the next step. Resuming from that file continues the uninterrupted run exactly
    (``ckpt_path=auto``). A signal during the last step lets the run finish normally.

    Args:
        dirpath: the run's checkpoint folder.
        signals: names of the signals handled (SIGTERM: SLURM/Kubernetes preemption, SIGINT:
            Ctrl-C, SIGUSR1: SLURM's warning signal with ``--signal=USR1@90``).
        requeue: after saving, requeue the job with ``scontrol requeue $SLURM_JOB_ID`` when
            running under SLURM (the requeued job resumes with ``ckpt_path=auto``).
    """

    def __init__(
        self,
        dirpath: str,
        signals: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1"),
        requeue: bool = False,
    ) -> None:
        valid = {s.name for s in signal.Signals}
        bad = [s for s in signals if s not in valid]
        if bad:
            raise ValueError(
                f"callbacks.preemption.signals: unknown signal names {bad} (e.g. SIGTERM, SIGUSR1)"
            )
        self.dirpath = Path(dirpath)
        self.signals = tuple(signal.Signals[s] for s in signals)
        self.requeue = bool(requeue)
        self.received: int | None = None
        self._stop: TrainingPreempted | None = None
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ handlers
    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            log.warning(
                "%s received: saving a checkpoint at the end of this step",
                signal.Signals(signum).name,
            )
        self.received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # installed after Lightning's own SIGTERM handler (which would exit with code 0 unsaved)
        self.received, self._stop = None, None
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook worker): leave signals alone
                log.warning("preemption handlers not installed: not in the main thread")
                break

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    # ------------------------------------------------------------------ the step boundary
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Save at the end of the step in which a signal arrived (the same point as the periodic
        checkpoints, so resuming is exact)."""
        if (batch_idx + 1) % max(1, trainer.accumulate_grad_batches):
            return  # inside a gradient-accumulation window: not a step boundary
        if self._stop is not None or not trainer.strategy.reduce_boolean_decision(
            self.received is not None, all=False
        ):
            return
        signum = self._agreed_signal(trainer)
        ckpt = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(ckpt)  # every rank takes part; rank 0 writes (atomically)
        requeued = self._requeue() if self.requeue and trainer.is_global_zero else False
        if trainer.is_global_zero:
            print(
                f"\n{signal.Signals(signum).name} received at step {trainer.global_step}: saved {ckpt}\n"
                f"resume with the same command and ckpt_path={ckpt} (or ckpt_path=auto)",
                flush=True,
            )
        self._stop = TrainingPreempted(signum, ckpt, requeued)
        if trainer.is_global_zero:
            self._stop.write_marker(self.dirpath)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Stop before the next step, once the saved step's metrics have reached the loggers."""
        if self._stop is not None:
            raise self._stop

    def _agreed_signal(self, trainer: pl.Trainer) -> int:
        """The signal to report: this rank's, else the highest any rank received."""
        import torch

        mine = torch.tensor(self.received or 0, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(mine, reduce_op="max")) or int(signal.SIGTERM)

    @staticmethod
    def _requeue() -> bool:
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = (
            f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            if job and "SLURM_ARRAY_TASK_ID" in os.environ
            else os.environ.get("SLURM_JOB_ID")
        )
        if not job:
            log.warning(
                "callbacks.preemption.requeue=true but SLURM_JOB_ID is not set: not requeued"
            )
            return False
        try:
            done = subprocess.run(
                ["scontrol", "requeue", job],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("scontrol requeue %s failed: %s", job, err)
            return False
        if done.returncode != 0:
            log.warning("scontrol requeue %s failed: %s", job, done.stderr.strip())
        return done.returncode == 0
