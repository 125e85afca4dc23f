"""Training throughput (images/s) and peak memory at the CIFAR-10 recipes' shapes (issues 7 and
34): CD-LPIPS (``cifar10_cd_lpips``: NCSN++, Heun N = 18, batch 512), CT (``cifar10_ct_lpips``),
ECT (``cifar10_ect``: DDPM++, batch 128), sCT (``cifar10_sct``: DDPM++, JVP tangent, batch 512)
and the bare network passes (online forward + backward of NCSN++ / DDPM++ at batch 512), each
in fp32 (TF32 off), bf16-mixed (autocast) and compiled (``model.compile_net``, fp32), at the
recipe's global batch or the largest micro-batch that fits (the rest by accumulation).

    .venv/bin/python benchmarks/gpu_throughput.py                  # on a GPU: rows into BENCHMARKS.md
    .venv/bin/python benchmarks/gpu_throughput.py --net tiny --batch 2 --device cpu --write ''

Models are built from the experiments' configs (Hydra). Timing does not depend on weights:
teachers are random networks of the recipe's shape saved as EDM checkpoints, and LPIPS uses a
random VGG16 of the right shapes unless ``--vgg16`` names the torchvision file. A training step
is ``zero_grad``, loss + backward over the micro-batches, optimizer step and the target/EMA
updates; images/s counts the global batch. ``--budget-s`` stops starting rows once spent (rows
run fp32 first, then bf16, then compiled); rows not run are listed as such.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cmexp  # noqa: E402, F401 - the config tree's resolvers
from benchmarks.modes_step_cost import fake_teacher  # noqa: E402
from benchmarks.training_and_sampling import _sync  # noqa: E402
from tests.fakes import write_fake_vgg16  # noqa: E402  (random VGG16 in the torchvision format)

#: recipe -> (experiment, what a step runs)
RECIPES = {
    "cd_lpips": (
        "cifar10_cd_lpips",
        "CD step: 2 teacher fwd (Heun) + target fwd + online fwd/bwd + LPIPS",
    ),
    "ct": ("cifar10_ct_lpips", "CT step: target fwd + online fwd/bwd + LPIPS"),
    "ect": ("cifar10_ect", "ECT step: target fwd at r + online fwd/bwd"),
    "sct": ("cifar10_sct", "sCT step: JVP (fwd + tangent) + online fwd/bwd"),
    "bare_ncsnpp": ("cifar10_edm", "NCSN++ online fwd/bwd only"),
    "bare_ddpmpp": ("cifar10_sct", "DDPM++ online fwd/bwd only"),
}
TEACHER = ("cd_lpips", "ect")
VARIANTS = ("fp32", "bf16", "compiled")
MARK = "<!-- gpu_throughput rows: {} -->"
END = "<!-- /gpu_throughput rows: {} -->"


def environment(device: str) -> dict:
    """Machine facts: device name, driver, torch, CUDA, cuDNN."""
    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        facts.update(
            device=torch.cuda.get_device_name(device),
            device_count=torch.cuda.device_count(),
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
        )
        try:
            smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            out = subprocess.run(smi, capture_output=True, text=True, timeout=30).stdout
            facts["driver"] = out.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            facts["driver"] = None
    else:
        facts.update(device=f"CPU ({facts['cpu']}, {torch.get_num_threads()} threads)")
    return facts


def build(recipe: str, args: argparse.Namespace, folder: Path) -> tuple:
    """The recipe's module (on the device), its optimizer and the batch size to time."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    experiment = RECIPES[recipe][0]
    over = [f"+experiment={experiment}", "trainer=cpu", "logger=none"]
    if recipe == "bare_ddpmpp":
        over.append("net=ddpmpp")
    if args.net:
        over.append(f"net={args.net}")
    if recipe in ("cd_lpips", "ct"):
        over += [f"metric.weights_path={args.vgg16}", f"metric.resize={args.lpips_resize}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=over)
    if recipe in TEACHER:
        OmegaConf.update(cfg, "model.teacher_path", str(fake_teacher(cfg, folder)))
    batch = args.batch or int(cfg.global_batch_size or cfg.dataset.batch_size)
    if recipe.startswith("bare"):
        batch = args.batch or 512
    args.last_batch = batch
    module = instantiate(cfg.model).to(args.device)
    module.train()
    params = (
        module.trainable_parameters()
        if hasattr(module, "trainable_parameters")
        else [p for p in module.model.parameters() if p.requires_grad]
    )
    opt = module.optimizer_factory(params=list(params))
    return module, opt, batch


def measure(recipe: str, variant: str, args: argparse.Namespace, micro: int, folder: Path) -> dict:
    """Images/s and peak memory of ``recipe`` in ``variant`` at micro-batch ``micro``."""
    module, opt, batch = build(recipe, args, folder)
    micro = min(micro, batch)
    if variant == "compiled":
        module.compile_net = True
        module.configure_model()
    accum = -(-batch // micro)
    m = module.model
    x = torch.rand(micro, m.img_channels, m.img_resolution, m.img_resolution) * 2 - 1
    x = x.to(args.device)
    sigma = torch.full((micro,), 1.0, device=args.device)
    amp = torch.autocast(
        device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=variant == "bf16"
    )
    bare = recipe.startswith("bare")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for _ in range(accum):
            with amp:
                loss = (
                    m(x, sigma).float().square().mean()
                    if bare
                    else module.compute_loss(x, None)[0]
                )
            (loss / accum).backward()
        if not bare:
            opt.step()
            module.after_optimizer_step()

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _sync()
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
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return {
        "recipe": recipe,
        "variant": variant,
        "status": "ok",
        "batch": micro * accum,
        "micro_batch": micro,
        "accumulation": accum,
        "step_s": sec,
        "images_per_s": micro * accum / sec,
        "first_step_s": first,
        "peak_mb": peak,
    }


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def run(recipe: str, variant: str, args: argparse.Namespace, folder: Path) -> dict:
    """:func:`measure` at the largest micro-batch (batch, batch/2, ...) that fits; an error is
    a row with its first line (e.g. a variant the recipe does not support)."""
    micro = 1 << 30
    while True:
        try:
            return measure(recipe, variant, args, micro, folder)
        except torch.OutOfMemoryError:
            _free()
            if micro == 1:
                return {"recipe": recipe, "variant": variant, "status": "out of memory"}
            micro = max(1, min(micro, args.last_batch) // 2)
        except Exception as err:  # noqa: BLE001 - reported in the table, the others still run
            traceback.print_exc()
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
            return {"recipe": recipe, "variant": variant, "status": f"error: {first}"}
        finally:
            _free()


def table(rows: list[dict]) -> list[str]:
    """The markdown rows of the results."""
    lines = [
        "| recipe | what a step runs | variant | batch (micro x accum) | step | images/s | peak memory | first step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        what = RECIPES[r["recipe"]][1]
        if r["status"] != "ok":
            lines.append(f"| {r['recipe']} | {what} | {r['variant']} | | | {r['status']} | | |")
            continue
        peak = "n/a (CPU)" if r["peak_mb"] != r["peak_mb"] else f"{r['peak_mb']:.0f} MB"
        lines.append(
            f"| {r['recipe']} | {what} | {r['variant']} | {r['batch']} ({r['micro_batch']} x "
            f"{r['accumulation']}) | {r['step_s']:.3f} s | **{r['images_per_s']:.1f}** | {peak} | "
            f"{r['first_step_s']:.1f} s |"
        )
    return lines


def summary(rows: list[dict], recipes: list[str], variants: list[str]) -> list[str]:
    """One line per recipe: images/s and peak memory of each variant."""
    head = f"{'recipe':<12} {'batch':>5}  " + "  ".join(f"{v:>22}" for v in variants)
    out = [
        head,
        f"{'':<12} {'':>5}  " + "  ".join(f"{'images/s | peak MB':>22}" for _ in variants),
    ]
    for rec in recipes:
        cells, batch = [], ""
        for v in variants:
            r = next((r for r in rows if r["recipe"] == rec and r["variant"] == v), None)
            if r is None:
                cells.append(f"{'-':>22}")
            elif r["status"] != "ok":
                cells.append(f"{r['status'][:22]:>22}")
            else:
                batch = str(r["batch"])
                peak = "n/a" if r["peak_mb"] != r["peak_mb"] else f"{r['peak_mb']:.0f}"
                cells.append(f"{r['images_per_s']:>12.1f} | {peak:>7}")
        out.append(f"{rec:<12} {batch:>5}  " + "  ".join(cells))
    return out


def write_rows(path: Path, facts: dict, args: argparse.Namespace, rows: list[dict]) -> None:
    """Put this device's section into ``path``, replacing its own earlier section."""
    name = facts["device"]
    cmd = " ".join(sys.argv[1:]) or "(defaults)"
    body = [
        MARK.format(name),
        f"### {name} -- {time.strftime('%Y-%m-%d')}",
        "",
        f"Driver {facts.get('driver')}, torch {facts['torch']}, CUDA {facts['cuda']}, cuDNN "
        f"{facts['cudnn']}. `benchmarks/gpu_throughput.py {cmd}`: median of {args.steps} steps "
        f"after {args.warmup} warm-up steps; LPIPS backbone: {args.vgg16_note}; teachers random; "
        "fp32 without TF32; compiled = fp32 with `model.compile_net=true` (the first step "
        "includes the compilation).",
        "",
        *table(rows),
        END.format(name),
    ]
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = text.find(MARK.format(name)), text.find(END.format(name))
    if start >= 0 and end > start:
        text = text[:start] + "\n".join(body) + text[end + len(END.format(name)) :]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body) + "\n"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument(
        "--compiled-recipes", default=None, help="the recipes timed compiled (default: all)"
    )
    ap.add_argument("--net", default=None, help="replace every recipe's net (smoke: tiny)")
    ap.add_argument("--batch", type=int, default=None, help="global batch (default: the recipe's)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lpips-resize", default="224", help="LPIPS input side (null: native)")
    ap.add_argument("--vgg16", default=None, help="torchvision VGG16 file (default: random)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no row after this")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--write", default=str(ROOT / "BENCHMARKS.md"), help="'' = do not write")
    args = ap.parse_args()
    recipes, variants = args.recipes.split(","), args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(
                f"error: --variants: unknown variant {v!r} (expected {', '.join(VARIANTS)})"
            )
    for r in recipes:
        if r not in RECIPES:
            raise SystemExit(f"error: --recipes: unknown recipe {r!r} ({', '.join(RECIPES)})")
    compiled = (args.compiled_recipes or args.recipes).split(",")
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (as cmexp.train)
        torch.backends.cudnn.allow_tf32 = False
    facts = environment(args.device)
    print("environment:", json.dumps(facts), flush=True)
    t_start = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.vgg16_note = "file " + args.vgg16 if args.vgg16 else "random (timing only)"
        args.vgg16 = args.vgg16 or str(write_fake_vgg16(Path(tmp) / "vgg"))
        for v in variants:
            for rec in recipes:
                if v == "compiled" and rec not in compiled:
                    continue
                if args.budget_s is not None and time.monotonic() - t_start > args.budget_s:
                    rows.append({"recipe": rec, "variant": v, "status": "not run (time budget)"})
                    continue
                rows.append(run(rec, v, args, Path(tmp)))
                print("row:", json.dumps(rows[-1]), flush=True)
    order = {(r, v): i for i, (r, v) in enumerate((r, v) for r in recipes for v in variants)}
    rows.sort(key=lambda r: order[(r["recipe"], r["variant"])])
    res = {"environment": facts, "rows": rows, "seconds": round(time.monotonic() - t_start, 1)}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.write:
        write_rows(Path(args.write), facts, args, rows)
    print("== throughput (images/s | peak MB) on", facts["device"])
    print("\n".join(summary(rows, recipes, variants)))
    if args.write:
        print(f"rows written to {args.write}")


if __name__ == "__main__":
    main()
