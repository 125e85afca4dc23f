"""cmexp.utils.csv_logger.ResumableCSVLogger: metrics.csv survives a resume into its folder."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger

from cmexp.utils.csv_logger import ResumableCSVLogger


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path / "csv" / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _first_process(cls: type, tmp_path: Path) -> None:
    log = cls(save_dir=str(tmp_path), name="csv", version="")
    for step in range(6):
        log.log_metrics({"train/loss": float(step)}, step=step)
    log.log_metrics({"val/fd": 9.0}, step=3)  # a callback's evaluation at the end of batch 2
    log.save()


def test_lightning_csv_logger_loses_the_earlier_rows(tmp_path: Path) -> None:
    """The behaviour the suite's logger exists to avoid (if Lightning changes it, drop ours)."""
    _first_process(CSVLogger, tmp_path)
    log = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    log.log_metrics({"train/loss": 30.0}, step=3)
    log.save()
    assert [r["step"] for r in _rows(tmp_path)] == ["3"]


def test_resume_keeps_rows_before_the_checkpoint_and_the_val_rows_of_its_step(
    tmp_path: Path,
) -> None:
    _first_process(ResumableCSVLogger, tmp_path)
    log = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")  # resumed at step 3
    log.log_metrics({"train/loss": 30.0, "lr": 0.1}, step=3)  # a new key: the header grows
    log.log_metrics({"train/loss": 40.0}, step=4)
    log.save()
    rows = _rows(tmp_path)
    assert [(r["step"], r["train/loss"], r["val/fd"]) for r in rows] == [
        ("0", "0.0", ""),
        ("1", "1.0", ""),
        ("2", "2.0", ""),
        ("3", "", "9.0"),
        ("3", "30.0", ""),
        ("4", "40.0", ""),
    ]
    assert rows[4]["lr"] == "0.1" and rows[0]["lr"] == ""


def test_a_fresh_start_in_a_used_folder_replaces_the_rows(tmp_path: Path) -> None:
    _first_process(ResumableCSVLogger, tmp_path)
    log = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    log.log_metrics({"train/loss": 7.0}, step=0)
    log.save()
    assert [(r["step"], r["train/loss"]) for r in _rows(tmp_path)] == [("0", "7.0")]
