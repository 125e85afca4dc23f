"""A CSV logger that keeps a run's earlier metrics when the run resumes into the same folder.

Lightning's ``CSVLogger`` deletes ``csv/metrics.csv`` when its folder is not empty, so a run
resumed with ``ckpt_path=...`` into its own folder (a requeued job, ``hydra.run.dir=`` fixed)
loses every metric logged before the checkpoint. ``ResumableCSVLogger`` keeps the file and,
at the first metrics this process logs (step k: the checkpoint's global step on a resume, 0 on
a fresh start), drops only what the interrupted process logged after that checkpoint and the
resumed one logs again: rows with step > k, and the rows of step k without ``val/`` values
(training metrics of batch k; the ``val/`` rows of step k were logged by callbacks at the end
of batch k - 1, before the checkpoint, and are not repeated). A resumed run's file thus holds
an uninterrupted run's metrics.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _KeepingWriter(ExperimentWriter):
    """``ExperimentWriter`` that keeps an existing ``metrics.csv`` (header and rows)."""

    def _check_log_dir_exists(self) -> None:
        self._pending_trim = self._fs.isfile(self.metrics_file_path)

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if self._pending_trim:
            self._pending_trim = False
            self._trim(len(self.metrics) if step is None else int(step))
        super().log_metrics(metrics_dict, step)

    def _trim(self, first_step: int) -> None:
        """Drop the rows logged after the checkpoint (module doc); adopt the header as the known keys."""
        with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if _keep(r, first_step)]
        if not header:
            self._fs.rm_file(self.metrics_file_path)
            return
        with self._fs.open(self.metrics_file_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = header


def _keep(row: dict[str, Any], first_step: int) -> bool:
    try:
        step = float(row.get("step") or 0)
    except ValueError:
        return True
    if step == first_step:
        return any(k.startswith("val/") and v not in (None, "") for k, v in row.items() if k)
    return step < first_step


class ResumableCSVLogger(CSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` whose ``metrics.csv`` survives a resume (module doc)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment
