"""scripts/results_fmnist.py: docs/results.md's table, curves and grids come from eval folders,
training logs and checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/results_fmnist.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _eval_folder(path: Path, sets: dict[str, tuple[list[float], float]]) -> Path:
    """A cmexp.eval output folder: metrics.json with the sets' noise levels and fd_fmnist."""
    path.mkdir(parents=True)
    metrics = {
        k: {
            "fd_fmnist": fd,
            "kid_fmnist": fd / 10,
            "is_fmnist": 5.0,
            "precision": 0.8,
            "recall": 0.5,
        }
        for k, (_, fd) in sets.items()
    }
    protocol = {
        "num_samples": 10000,
        "reference": {"count": 10000, "split": "test"},
        "sets": {
            k: {
                "sigmas": s,
                "nfe": len(s) if s[-1] > 0 else 2 * len(s) - 3,
                "sampler": "heun" if s[-1] == 0 else "consistency",
            }
            for k, (s, _) in sets.items()
        },
    }
    (path / "metrics.json").write_text(json.dumps({"metrics": metrics, "protocol": protocol}))
    return path


def test_table_reads_every_sample_set_of_the_eval_folders(tmp_path: Path) -> None:
    teacher = _eval_folder(
        tmp_path / "t", {"heun35nfe": ([80.0, 40.0, 20.0, 10.0, 1.0, 0.002, 0.0], 11.3216)}
    )
    student = _eval_folder(
        tmp_path / "s", {"1step": ([80.0], 44.16), "2step": ([80.0, 3.2568], 31.38)}
    )
    out = _script("table", str(tmp_path / "out"), f"teacher={teacher}", f"CD={student}")
    assert out.returncode == 0, out.stderr
    md = (tmp_path / "out" / "results_table.md").read_text().splitlines()
    assert md[2].startswith(
        "| teacher | heun35nfe | 11 | heun on 6 levels 80 ... 0.002 | 11.32 | 1.132 |"
    )
    assert md[3].startswith("| CD | 1step | 1 | 80 | 44.16 |") and md[4].startswith(
        "| CD | 2step | 2 | 80 3.257 | 31.38 |"
    )
    assert md[4].endswith("| 0.800 | 0.500 | 10000 | 10000 test |")
    missing = _script("table", str(tmp_path / "out"), f"x={tmp_path / 'nothing'}")
    nothing = tmp_path / "nothing"
    assert (missing.returncode, missing.stderr) == (
        1,
        f"x={nothing}: no metrics.json there (run cmexp.eval with hydra.run.dir={nothing})\n",
    )
    no_label = _script("table", str(tmp_path / "out"), "no-equals-sign")
    assert (no_label.returncode, no_label.stderr) == (
        1,
        "expected LABEL=VALUE, got 'no-equals-sign'\n",
    )


def test_curves_read_a_training_log_and_a_kimg_fd_file(tmp_path: Path) -> None:
    run = tmp_path / "run" / "csv"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text(
        "step,train/kimg,val/fd_fmnist_1step,val/fd_fmnist_2step\n"
        "249,16.0,,\n249,,90.0,50.0\n499,32.0,,\n499,,70.0,40.0\n"
    )
    (tmp_path / "teacher.csv").write_text("kimg,fd,set\n64,170.9,Heun\n848,11.3,Heun\n")
    out = _script(
        "curves",
        str(tmp_path / "out"),
        f"main={tmp_path / 'run'}",
        f"teacher={tmp_path / 'teacher.csv'}",
    )
    assert out.returncode == 0, out.stderr
    rows = (tmp_path / "out" / "results_curves.csv").read_text().splitlines()
    assert rows[0] == "model,kimg,fd_fmnist"
    assert set(rows[1:]) == {
        "main 1step,16.0,90.0",
        "main 1step,32.0,70.0",
        "main 2step,16.0,50.0",
        "main 2step,32.0,40.0",
        "teacher Heun,64.0,170.9",
        "teacher Heun,848.0,11.3",
    }
    assert (tmp_path / "out" / "results_curves.png").stat().st_size > 1000


def test_grids_sample_the_zoo_models_with_the_same_seeds(tmp_path: Path) -> None:
    out = _script(
        "grids",
        str(tmp_path),
        "CD 1 step=zoo:fmnist_cd:1",
        "CD 2 steps=zoo:fmnist_cd:2:3.2568",
        "--num",
        "2",
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "results_grid.png").stat().st_size > 1000
    bad = _script("grids", str(tmp_path), "x=zoo:fmnist_cd")
    assert (bad.returncode, bad.stderr) == (1, "x=zoo:fmnist_cd: expected CKPT:STEPS[:TAU]\n")
