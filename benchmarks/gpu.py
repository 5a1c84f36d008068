"""The full profile's GPU work: DreamBooth per memory preset, generation, and the classifier.

With CUDA (the full sizes):

1. DreamBooth on an SD-2.1-base-shaped model (random weights; ``synth_xray_assets_tests/sd21.py``)
   at 512 px, 8 instance + 8 class images per step, for each memory preset (study,
   memory-saving, lora): optimizer steps per second and peak GPU memory. Each preset runs in its
   own process, so its peak is its own.
2. Generation at 512 px, 50 DPM-Solver steps, guidance 4, fp16, batch from free memory: images/s.
3. DenseNet-121 at 224 px, batch 256: training images/s in plain fp32 (contiguous, augmentation
   in CPU workers) against ours (mixed precision, channels_last, augmentation on the GPU), and
   the largest batch that fits each way (doubling until CUDA runs out of memory).
4. With two cards or more: data-parallel DreamBooth (study preset) through the asset's launcher
   (torchrun, ``dreambooth/data_parallel.py``) on 1 rank and on 2, the global batch the same:
   optimizer steps/s each way and the efficiency, 2-rank rate / (2 x 1-rank rate).

Without CUDA the same code runs at tiny sizes (the demo's tiny SD at 64 px, DenseNet-121 at
32 px; data-parallel DreamBooth on 2 gloo ranks) so that the script stays working; its figures are
not GPU figures.

    .venv/bin/python benchmarks/gpu.py [--tiny] [--steps 6]
                                       [--skip dreambooth,generation,classifier,data-parallel]
                                       [--costs benchmarks/costs_measured.json]

``--costs PATH`` (CUDA at the full sizes only) writes the cost table of ``benchmarks/schedule.py``:
``benchmarks/costs_full.json`` with the rates measured here (DreamBooth optimizer steps/s of the
study preset, generation images/s, also the base model's reference images', the classifier's
training images/s, our way, and with two cards the data-parallel efficiency) replaced, marked
``estimate: false`` with this card as their source; then
``benchmarks/schedule.py --costs PATH`` schedules the study with them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests folder holds SD 2.1's configuration


@dataclass(frozen=True)
class Sizes:
    resolution: int  # DreamBooth and generation
    instance_batch: int  # + as many class images
    gen_steps: int
    gen_images: int
    clf_resolution: int
    clf_batch: int
    clf_steps: int
    max_batch: int  # the batch search's ceiling


FULL = Sizes(512, 8, 50, 16, 224, 256, 10, 4096)
TINY = Sizes(64, 2, 5, 4, 32, 16, 3, 64)


def _base_model(folder: Path, sizes: Sizes, cuda: bool) -> Path:
    if cuda:
        from synth_xray_assets_tests.sd21 import build_sd21_shaped

        return build_sd21_shaped(folder)
    from synth_xray_assets.dreambooth.tiny import build_tiny_pipeline
    from synth_xray_assets.settings import Settings

    s = Settings.for_profile("demo")
    build_tiny_pipeline(s.base_model, sizes.resolution).save_pretrained(folder, safe_serialization=True)
    return folder


# ---------------------------------------------------------------- DreamBooth per preset


def _bench_run(preset: str, sizes: Sizes, steps: int):
    """The DreamBooth settings of a timed run (``preset``'s options, no accumulation, checkpoint or
    warm-up) and its random instance and class images."""
    from synth_xray_assets.dreambooth.presets import PRESET_UPDATES
    from synth_xray_assets.settings import DreamBoothSettings

    db = DreamBoothSettings(
        resolution=sizes.resolution,
        train_batch_size=sizes.instance_batch,
        gradient_accumulation_steps=1,
        max_train_steps=steps,
        checkpointing_steps=0,
        lr_warmup_steps=0,
        memory_preset="none",
    ).model_copy(update=PRESET_UPDATES[preset])
    rng = np.random.default_rng(0)
    shape = (sizes.instance_batch * 2, sizes.resolution, sizes.resolution)
    return db, (rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 256, shape, dtype=np.uint8))


def _dreambooth_worker(preset: str, base: str, sizes: Sizes, steps: int, queue: mp.Queue) -> None:
    from dreambooth_steps import timed_dreambooth

    cuda = torch.cuda.is_available()
    db, (inst, cls) = _bench_run(preset, sizes, steps)
    rate, result = timed_dreambooth(base, inst, cls, db, "cuda" if cuda else "cpu")
    queue.put((rate, result.peak_memory_bytes / 2**30))


def bench_dreambooth(base: Path, sizes: Sizes, steps: int) -> dict[str, float]:
    """Prints, and returns, each preset's micro-batches per second (accumulation 1)."""
    from synth_xray_assets.dreambooth.presets import PRESET_ORDER, PRESET_UPDATES, has_bitsandbytes

    print(
        f"\nDreamBooth, {sizes.resolution} px, {sizes.instance_batch} instance + "
        f"{sizes.instance_batch} class images per step, {steps} steps per preset"
    )
    print(f"{'preset':16s} {'options':52s} {'steps/s':>8s} {'peak GiB':>9s}")
    ctx = mp.get_context("spawn")
    rates: dict[str, float] = {}
    for preset in PRESET_ORDER:
        options = ", ".join(f"{k}={v}" for k, v in PRESET_UPDATES[preset].items()) or "the study's settings"
        if PRESET_UPDATES[preset].get("use_8bit_adam") and not has_bitsandbytes():
            print(f"{preset:16s} {options:52s} {'-':>8s} {'-':>9s}  skipped: bitsandbytes not installed")
            continue
        queue: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=_dreambooth_worker, args=(preset, str(base), sizes, steps, queue))
        proc.start()
        proc.join()
        if proc.exitcode:
            print(f"{preset:16s} {options:52s} failed (exit {proc.exitcode}; out of memory?)")
            continue
        rate, peak = queue.get()
        rates[preset] = rate
        print(f"{preset:16s} {options:52s} {rate:8.3f} {peak:9.2f}")
    return rates


# ---------------------------------------------------------------- data-parallel DreamBooth

STEP_LINE = re.compile(r"^step (\d+)/\d+ ")  # rank 0's line after each optimizer step


def _launched_rate(job, images: tuple[np.ndarray, np.ndarray], ranks: int) -> float:
    """Optimizer steps/s of ``job`` launched on ``ranks`` processes as the asset launches it (on the
    first ``ranks`` cards this process sees), timed from rank 0's step lines after the first two
    (warm-up)."""
    from synth_xray_assets.cards import physical_index
    from synth_xray_assets.dreambooth.data_parallel import launch_command, read_result, write_job

    folder = job.work_dir / "data-parallel"
    job_file = write_job(folder, job, *images)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(physical_index(r, visible) for r in range(ranks))}
    seen: list[tuple[int, float]] = []  # (step, when its line came)
    with subprocess.Popen(
        launch_command(job_file, ranks), stdout=subprocess.PIPE, text=True, env=env
    ) as proc:
        for line in proc.stdout:
            if found := STEP_LINE.match(line):
                seen.append((int(found.group(1)), time.perf_counter()))
    read_result(folder)  # raises naming the rank that failed
    if proc.returncode:
        raise RuntimeError(f"data-parallel DreamBooth on {ranks} ranks exited {proc.returncode}")
    if len(seen) < 3:
        return float("nan")
    (first, t0), (last, t1) = seen[1], seen[-1]
    return (last - first) / (t1 - t0)


def bench_data_parallel(base: Path, sizes: Sizes, steps: int, tmp: Path) -> float:
    """Prints, and returns, the efficiency of 2 ranks: their steps/s / (2 x one rank's)."""
    from synth_xray_assets.dreambooth.data_parallel import DataParallelJob

    cuda = torch.cuda.is_available()
    db, images = _bench_run("study", sizes, steps)
    print(
        f"\nData-parallel DreamBooth (study preset), {sizes.resolution} px, global batch "
        f"{sizes.instance_batch} + {sizes.instance_batch}, {steps} steps, through torchrun "
        f"({'NCCL' if cuda else 'gloo, CPU: not a GPU figure'})"
    )
    rates = {}
    for ranks in (1, 2):
        job = DataParallelJob(
            base, db.instance_prompts["normal"], db, tmp / f"out-{ranks}", tmp / f"work-{ranks}",
            "cuda" if cuda else "cpu", "study",
        )  # fmt: skip
        rates[ranks] = _launched_rate(job, images, ranks)
        print(f"  {ranks} rank(s): {rates[ranks]:.3f} optimizer steps/s")
    efficiency = rates[2] / (2 * rates[1])
    print(f"  efficiency on 2 cards: {efficiency:.2f} (1.00: twice the speed)")
    return efficiency


# ---------------------------------------------------------------- generation


def bench_generation(base: Path, sizes: Sizes) -> float:
    from synth_xray_assets.diffusion.pipelines import load_pipeline, sample_images, use_dpm_solver
    from synth_xray_assets.dreambooth.presets import generation_plan, with_plan
    from synth_xray_assets.hardware import free_gpu_memory
    from synth_xray_assets.settings import GenerationSettings

    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = generation_plan(8, sizes.resolution, free_gpu_memory(device), GenerationSettings())
    pipe = use_dpm_solver(with_plan(load_pipeline(base, device, plan.dtype), plan))
    sample_images(pipe, "a chest xray image", [0], 2, 4.0, sizes.resolution)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0, made = time.perf_counter(), 0
    while made < sizes.gen_images:
        seeds = list(range(made, min(made + plan.batch_size, sizes.gen_images)))
        sample_images(pipe, "a chest xray image", seeds, sizes.gen_steps, 4.0, sizes.resolution)
        made += len(seeds)
    if device == "cuda":
        torch.cuda.synchronize()
    rate = made / (time.perf_counter() - t0)
    print(
        f"\nGeneration, {sizes.resolution} px, {sizes.gen_steps} DPM-Solver steps, guidance 4: "
        f"{rate:.3f} images/s (batch {plan.batch_size}, {str(plan.dtype).removeprefix('torch.')}, "
        f"VAE slicing {plan.vae_slicing}, {device})"
    )
    return rate


# ---------------------------------------------------------------- classifier


def _classifier_rate(ours: bool, batch: int, sizes: Sizes, steps: int) -> float:
    """Training images/s of DenseNet-121 over ``steps`` batches after one warm-up batch."""
    import torch.nn.functional as F

    from synth_xray_assets.classifier.data import make_train_loader, normalize_batch
    from synth_xray_assets.classifier.model import build_densenet121
    from synth_xray_assets.classifier.step import MicroBatchStep, choose_precision, prepare_model
    from synth_xray_assets.classifier.train import TrainBatches
    from synth_xray_assets.hardware import loader_workers
    from synth_xray_assets.settings import ClassifierSettings

    device = "cuda" if torch.cuda.is_available() else "cpu"
    r = sizes.clf_resolution
    s = ClassifierSettings(resolution=r, resize=r, batch_size=batch, pretrained="none")
    n = batch * (steps + 1)
    images = torch.randint(0, 256, (n, r, r), dtype=torch.uint8)
    labels = np.random.default_rng(0).integers(0, 2, n)
    if ours:
        model = prepare_model(build_densenet121(s), device, device == "cuda")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        step = MicroBatchStep(model, opt, s, choose_precision(device, "auto"), device, log=lambda m: None)
        batches = TrainBatches(images, labels, s, 0, device, None).epoch(0)
        run = lambda: step(*next(batches))  # noqa: E731
    else:
        model = build_densenet121(s).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        loader, sampler = make_train_loader(images, labels, s, 0, num_workers=loader_workers(1))
        sampler.set_epoch(0)
        it = iter(loader)

        def run() -> None:
            x, y = next(it)
            loss = F.cross_entropy(model(normalize_batch(x.to(device))), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    model.train()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def _largest_batch(ours: bool, sizes: Sizes) -> str:
    if not torch.cuda.is_available():
        return "n/a (CPU)"
    batch, fits = 64, 0
    while batch <= sizes.max_batch:
        try:
            _classifier_rate(ours, batch, sizes, 1)
            fits = batch
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        batch *= 2
    return f">= {fits}" if fits == sizes.max_batch else str(fits)


def bench_classifier(sizes: Sizes) -> float:
    """Prints both ways; returns ours (training images/s)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nDenseNet-121 training, {sizes.clf_resolution} px, batch {sizes.clf_batch}, {device}")
    print(f"{'way':62s} {'images/s':>9s} {'largest batch':>14s}")
    for ours, name in (
        (False, "plain: fp32, contiguous, augmentation in CPU workers"),
        (True, "ours: mixed precision, channels_last, augmentation on the GPU"),
    ):
        if ours and device == "cpu":
            name = "ours on the CPU: fp32, CPU workers (GPU options are CUDA only)"
        rate = _classifier_rate(ours, sizes.clf_batch, sizes, sizes.clf_steps)
        print(f"{name:62s} {rate:9.1f} {_largest_batch(ours, sizes):>14s}")
    return rate


def write_costs(path: Path, card: str, measured: dict[str, tuple[float, str]]) -> None:
    """``benchmarks/costs_full.json`` with the ``measured`` entries (name -> value, what) replaced."""
    table = json.loads((ROOT / "benchmarks" / "costs_full.json").read_text())
    source = f"benchmarks/gpu.py on {card}, {time.strftime('%Y-%m-%d')}"
    for name, (value, what) in measured.items():
        entry = table["costs"][name]
        entry.update(value=round(value, 4), source=f"{source}: {what}", estimate=False)
    table["card"] = card
    path.write_text(json.dumps(table, indent=2) + "\n")
    print(f"\ncost table for benchmarks/schedule.py: {path} ({', '.join(measured)} measured)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny sizes even on a GPU")
    parser.add_argument("--steps", type=int, default=6, help="DreamBooth steps per preset")
    parser.add_argument(
        "--skip", default="", help="comma-separated: dreambooth,generation,classifier,data-parallel"
    )
    parser.add_argument("--costs", type=Path, help="write the cost table of benchmarks/schedule.py here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    sizes = TINY if args.tiny or not cuda else FULL
    skip = set(filter(None, args.skip.split(",")))
    card = torch.cuda.get_device_name() if cuda else "no GPU: tiny sizes, CPU figures"
    if args.costs and sizes is not FULL:
        parser.error("--costs needs CUDA at the full sizes: tiny figures are not the full profile's")
    print(f"benchmarks/gpu.py on {card}; torch {torch.__version__}")
    measured: dict[str, tuple[float, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not {"dreambooth", "generation", "data-parallel"} <= skip:
            base = _base_model(Path(tmp) / "base", sizes, cuda and not args.tiny)
        if "dreambooth" not in skip:
            rates = bench_dreambooth(base, sizes, args.steps)
            if "study" in rates:  # an optimizer step of the study accumulates two micro-batches
                from synth_xray_assets.settings import DreamBoothSettings

                accumulation = DreamBoothSettings().gradient_accumulation_steps
                what = f"study preset, {rates['study']:.3f} micro-batches/s / {accumulation} accumulated"
                measured["dreambooth_optimizer_steps_per_s"] = (rates["study"] / accumulation, what)
        two_cards = torch.cuda.device_count() >= 2 or not cuda  # gloo on the CPU keeps it working
        if "data-parallel" not in skip and two_cards:
            efficiency = bench_data_parallel(base, sizes, max(args.steps, 4), Path(tmp))
            measured["dreambooth_data_parallel_per_doubling"] = (
                efficiency,
                "2-rank optimizer steps/s / (2 x 1-rank), study preset, through torchrun",
            )
        if "generation" not in skip:
            rate = bench_generation(base, sizes)
            measured["generation_images_per_s"] = (
                rate,
                f"{sizes.gen_images} images, {sizes.gen_steps} DPM-Solver steps",
            )
            # base_model_images samples this same base pipeline with the same sampler
            measured["base_model_images_per_s"] = (
                rate,
                f"{sizes.gen_images} base-model images, {sizes.gen_steps} DPM-Solver steps",
            )
    if "classifier" not in skip:
        rate = bench_classifier(sizes)
        measured["classifier_train_images_per_s"] = (rate, f"ours, batch {sizes.clf_batch}, training only")
    if args.costs:
        write_costs(args.costs, card, measured)


if __name__ == "__main__":
    main()
