"""Where a run came from: the command line, the git commit and the machine, recorded in the
run folder and in every checkpoint (the model zoo's provenance files are made from it)."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any


def git_commit(cwd: str | Path | None = None) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the source tree (``cwd``: this package's checkout);
    empty values outside a git checkout."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": "", "dirty": None}
    return {"commit": sha, "dirty": bool(status)}


def machine() -> dict[str, Any]:
    """Cores, CPU model, GPU (if any) and the torch version."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
    }
    try:
        import torch

        info["torch"] = str(torch.__version__)  # a plain str: checkpoints load with weights_only
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def run_provenance(
    entry: str = "cmexp.train", overrides: list[str] | None = None
) -> dict[str, Any]:
    """The command (``python -m <entry> <overrides>``), commit, machine and start time."""
    if overrides is None:
        overrides = sys.argv[1:]
    return {
        "command": " ".join(["python", "-m", entry, *(shlex.quote(o) for o in overrides)]),
        **git_commit(),
        "machine": machine(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
