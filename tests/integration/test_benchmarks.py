"""The benchmark scripts run end to end on a tiny network (their figures are not asserted:
benchmarks measure, tests do not time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _throughput(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out, js = tmp_path / "B.md", tmp_path / "t.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_throughput.py",
            "--net",
            "tiny",
            "--batch",
            "2",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--lpips-resize",
            "null",
            "--write",
            str(out),
            "--json",
            str(js),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(js.read_text()), out.read_text()


def test_gpu_throughput_script_runs_its_recipes_and_replaces_its_own_rows(
    tmp_path: Path,
) -> None:
    # LPIPS (random VGG16 written on the fly) in fp32; a second run replaces the device's rows
    res, table = _throughput(tmp_path, "--recipes", "cd_lpips", "--variants", "fp32")
    assert [(r["recipe"], r["variant"], r["status"]) for r in res["rows"]] == [
        ("cd_lpips", "fp32", "ok")
    ]
    assert "| cd_lpips | CD step" in table and "| fp32 | 2 (2 x 1) |" in table
    res, table = _throughput(tmp_path, "--recipes", "ect,bare_ncsnpp", "--variants", "bf16")
    assert [(r["recipe"], r["variant"]) for r in res["rows"]] == [
        ("ect", "bf16"),
        ("bare_ncsnpp", "bf16"),
    ]
    assert all(r["images_per_s"] > 0 and r["batch"] == 2 for r in res["rows"])
    assert table.count("<!-- gpu_throughput rows: CPU") == 1 and "cd_lpips" not in table
    assert "| ect | ECT step" in table


def test_gpu_throughput_rejects_an_unknown_variant() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_throughput.py", "--variants", "fp16", "--write", ""],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stderr) == (
        1,
        "error: --variants: unknown variant 'fp16' (expected fp32, bf16, compiled)\n",
    )


def test_modes_step_cost_script_times_every_mode_and_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "B.md"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/modes_step_cost.py",
            "--net",
            "tiny",
            "--batch",
            "4",  # IMM's particle groups of 4 must divide it
            "--repeat",
            "1",
            "--write",
            str(out),
            "--profile",
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    modes = ["ct", "ect", "sct", "scd", "cd", "imm", "meanflow", "tcm"]
    assert [r["mode"] for r in rows] == modes
    assert all(r["full_s"] > 0 and r["bare_s"] > 0 for r in rows)
    by_mode = {r["mode"]: r for r in rows}
    # the op-level account: sCT and MeanFlow run exactly their bare passes' convolutions (the
    # JVP and the online pass; backward only through the online pass), and pay an optimizer step
    for mode in ("sct", "meanflow", "ct", "cd"):
        r = by_mode[mode]
        assert (r["conv_full"], r["conv_bwd_full"]) == (r["conv_bare"], r["conv_bwd_bare"]), mode
        assert 0 < r["optimizer_share"] < 0.5, mode
    table = out.read_text()
    assert (
        "| sct | JVP (fwd + tangent) + online fwd/bwd |" in table
        and "## Step cost of each training mode" in table
    )
