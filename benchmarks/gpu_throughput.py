"""Benchmark 5 of issue 7: training throughput (images/s) and peak memory of the CIFAR-10
configurations -- NCSN++ CD (Heun, N = 18, LPIPS) and CT -- in fp32, bf16-mixed and with the
online network compiled, at the paper's batch of 512 or the largest micro-batch that fits
(the rest by gradient accumulation, as ``global_batch_size`` does in training).

    .venv/bin/python benchmarks/gpu_throughput.py                      # on a GPU: the issue's rows
    .venv/bin/python benchmarks/gpu_throughput.py --net tiny --batch 8 --device cpu --variants fp32,bf16 --write ''

LPIPS timing does not depend on the VGG16 values: without ``--vgg16`` (the torchvision file)
a random VGG16 of the right shapes is written to a temporary folder and the output says so.
A step is ``zero_grad``, loss + backward over the micro-batches, optimizer step and the
target/EMA updates; images/s counts the global batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_and_sampling import ROOT, _sync, build  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests.fakes import write_fake_vgg16  # noqa: E402  (random VGG16 in the torchvision format)


def measure(kind: str, variant: str, args: argparse.Namespace, vgg16: str, micro: int) -> dict:
    """Images/s and peak memory of full training steps of ``kind`` in ``variant``."""
    metric = args.metric if kind == "cd" else args.ct_metric
    module, _, opt, x = build(
        kind,
        args.net,
        micro,
        args.device,
        channels=args.channels,
        metric=metric,
        weights_path=vgg16,
    )
    module.train()
    if variant == "compiled":
        module.compile_net = True
        module.configure_model()
    accum = args.batch // micro
    amp = torch.autocast(
        device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=variant == "bf16"
    )

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for _ in range(accum):
            with amp:
                loss, _ = module.compute_loss(x, None)
            (loss / accum).backward()
        opt.step()
        module.after_optimizer_step()

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()  # includes compilation for variant="compiled"
    _sync()
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        _sync()
        t0 = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if args.device.startswith("cuda")
        else float("nan")
    )
    return {
        "kind": kind,
        "metric": metric,
        "variant": variant,
        "micro_batch": micro,
        "accumulation": accum,
        "step_s": sec,
        "images_per_s": args.batch / sec,
        "first_step_s": first,
        "peak_mb": peak,
    }


def run(kind: str, variant: str, args: argparse.Namespace, vgg16: str) -> dict:
    """:func:`measure` at the largest micro-batch (batch, batch/2, ...) that fits in memory."""
    micro = args.batch
    while True:
        try:
            return measure(kind, variant, args, vgg16, micro)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if micro == 1:
                raise
            micro //= 2
            while args.batch % micro:
                micro -= 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", default="ncsnpp")
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument(
        "--batch", type=int, default=512, help="global batch (micro-batch x accumulation)"
    )
    ap.add_argument("--metric", default="lpips", help="CD metric (lpips, l2, l1, pseudo_huber)")
    ap.add_argument("--ct-metric", default="lpips", help="CT metric")
    ap.add_argument("--kinds", default="cd,ct")
    ap.add_argument("--variants", default="fp32,bf16,compiled")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--vgg16",
        default=None,
        help="torchvision VGG16 file (default: random weights, timing only)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--write", default=str(ROOT / "BENCHMARKS.md"), help="append the table here ('' = do not)"
    )
    args = ap.parse_args()
    for v in args.variants.split(","):
        if v not in ("fp32", "bf16", "compiled"):
            raise SystemExit(
                f"error: --variants: unknown variant {v!r} (expected fp32, bf16, compiled)"
            )
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (as cmexp.train)
        torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        vgg16 = args.vgg16 or str(write_fake_vgg16(Path(tmp)))
        rows = [
            run(k, v, args, vgg16) for k in args.kinds.split(",") for v in args.variants.split(",")
        ]
    machine = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({args.device})"
    )
    res = {
        "machine": machine,
        "torch": torch.__version__,
        "net": args.net,
        "batch": args.batch,
        "vgg16": "file " + args.vgg16 if args.vgg16 else "random (timing only)",
        "rows": rows,
    }
    print(json.dumps(res, indent=2))
    if args.write:
        lines = [
            f"\n## Training throughput (issue 7, benchmark 5) -- {time.strftime('%Y-%m-%d')}, {machine}, torch {torch.__version__}\n",
            f"`benchmarks/gpu_throughput.py --net {args.net} --batch {args.batch}` (median of {args.steps} steps "
            f"after {args.warmup} warm-up steps; LPIPS backbone: {res['vgg16']}; fp32 without TF32):\n",
            "| configuration | variant | micro-batch x accumulation | step | images/s | peak memory | first step |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            name = (
                "CD (Heun, N=18, " + r["metric"] + ")"
                if r["kind"] == "cd"
                else "CT (" + r["metric"] + ")"
            )
            peak = "n/a (CPU)" if r["peak_mb"] != r["peak_mb"] else f"{r['peak_mb']:.0f} MB"
            lines.append(
                f"| {name} | {r['variant']} | {r['micro_batch']} x {r['accumulation']} | {r['step_s']:.3f} s | "
                f"{r['images_per_s']:.0f} | {peak} | {r['first_step_s']:.1f} s |"
            )
        out = Path(args.write)
        out.write_text(
            (out.read_text() if out.exists() else "# Benchmarks\n") + "\n".join(lines) + "\n"
        )


if __name__ == "__main__":
    main()
