"""cmexp.compare on fixture runs: labels from config keys, one panel per metric, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cmexp.compare import compare, config_value, find_runs, main


def fake_run(root: Path, name: str, solver: str, num_scales: int, fd: list[float]) -> Path:
    """A run folder as cmexp.train writes it: choices, resolved config, overrides, CSV log."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / "csv").mkdir()
    (run / "choices.yaml").write_text(
        yaml.safe_dump({"experiment": "fmnist_cd_l2", "solver": solver, "metric": "l2"})
    )
    (run / "config_resolved.yaml").write_text(
        yaml.safe_dump({"schedule": {"num_scales": num_scales, "mu": 0.0}})
    )
    (run / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump(
            [
                "+experiment=fmnist_cd_l2",
                "trainer.max_steps=300",
                f"schedule.num_scales={num_scales}",
            ]
        )
    )
    rows = ["step,train/kimg,train/loss,val/fd_fmnist_1step,val/fd_fmnist_2step"]
    for i, v in enumerate(fd):
        step = 100 * (i + 1)
        rows.append(f"{step - 1},{step * 0.064:.3f},0.5,,")  # a training row
        rows.append(f"{step},,,{v},{v / 2}")  # the evaluation row
    (run / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    return run


def test_labels_come_from_config_keys_across_sweeps(tmp_path: Path) -> None:
    fake_run(tmp_path / "euler", "0", "euler", 18, [90.0, 70.0])
    fake_run(tmp_path / "heun", "0", "heun", 18, [80.0, 50.0])
    fake_run(tmp_path / "heun", "1", "heun", 50, [85.0, 60.0])
    runs = find_runs(
        [str(tmp_path / "euler"), str(tmp_path / "heun")], ["solver", "schedule.num_scales"]
    )
    assert [r.label for r in runs] == [
        "solver=euler,schedule.num_scales=18",
        "solver=heun,schedule.num_scales=18",
        "solver=heun,schedule.num_scales=50",
    ]
    # without keys: the overrides that differ (the solver is a sweep parameter not in these overrides)
    assert [r.label for r in find_runs([str(tmp_path / "heun")])] == [
        "schedule.num_scales=18",
        "schedule.num_scales=50",
    ]
    assert (
        config_value(runs[0].path, "metric") == "l2"
        and config_value(runs[0].path, "schedule.mu") == "0.0"
    )
    assert config_value(runs[0].path, "schedule.nope") is None


def test_one_panel_per_metric_and_final_values(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    fake_run(tmp_path, "0", "heun", 18, [80.0, 50.0])
    fake_run(tmp_path, "1", "euler", 18, [90.0, 70.0])
    one = compare(
        [str(tmp_path)], tmp_path / "one", metric="val/fd_fmnist_1step", label_keys=["solver"]
    )
    two = compare(
        [str(tmp_path)],
        tmp_path / "two",
        metric=["val/fd_fmnist_1step", "val/fd_fmnist_2step"],
        label_keys=["solver"],
        title="Fig. 3(b)",
    )
    w1, w2 = mpimg.imread(one["png"]).shape[1], mpimg.imread(two["png"]).shape[1]
    assert w2 > 1.8 * w1  # two panels side by side
    md = two["md"].read_text().splitlines()
    header = [c.strip() for c in md[0].split("|")[1:-1]]
    row = dict(zip(header, [c.strip() for c in md[2].split("|")[1:-1]], strict=True))
    assert (
        row["run"] == "solver=heun"
        and row["val/fd_fmnist_1step"] == "50"
        and row["val/fd_fmnist_2step"] == "25"
    )
    # the curve is matched to images seen through the step of the training row before it
    x, y = find_runs([str(tmp_path / "0")])[0].curve("val/fd_fmnist_1step")
    assert y == [80.0, 50.0] and x == pytest.approx([6.4, 12.8])


def test_bad_label_or_metric_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_run(tmp_path, "0", "heun", 18, [80.0])
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "--label", "solverr", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        f"error: --label solverr: not a config group or key of the run {tmp_path / '0'}\n"
    )
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "--metric", "val/fid_1step", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "error: --metric val/fid_1step: not logged by any run (logged: train/kimg, train/loss, "
        "val/fd_fmnist_1step, val/fd_fmnist_2step)\n"
    )
