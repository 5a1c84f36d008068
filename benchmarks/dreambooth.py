"""DreamBooth training speed and peak memory for the demo model: plain, and with the memory options.

Each configuration runs ``train_dreambooth`` (the code the asset runs) in its own process, so
that peak memory is that configuration's own. On CUDA it also runs a few steps of an
SD-2.1-shaped UNet and text encoder (random weights, 512 px) when ``--sd21`` is given.

    .venv/bin/python benchmarks/dreambooth.py [--steps 12] [--sd21]
"""

import argparse
import multiprocessing as mp
import tempfile
from pathlib import Path

import numpy as np

CONFIGS = {
    "plain (fp32, no memory options)": {},
    "gradient checkpointing": {"gradient_checkpointing": True},
    "gradient checkpointing + 8-bit Adam": {"gradient_checkpointing": True, "use_8bit_adam": True},
    "LoRA (rank 8)": {"method": "lora"},
}


def _run(name: str, options: dict, steps: int, queue: mp.Queue, sd21: bool) -> None:
    import resource

    import torch
    from dreambooth_steps import timed_dreambooth

    from synth_xray_assets.dreambooth.tiny import build_tiny_pipeline
    from synth_xray_assets.settings import Settings

    s = Settings.for_profile("full" if sd21 else "demo")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        if sd21:
            bm = s.base_model.model_copy(
                update={
                    "tiny_vae_channels": (128, 256, 512, 512),
                    "tiny_unet_channels": (320, 640, 1280, 1280),
                    "tiny_text_width": 1024,
                    "tiny_text_layers": 23,
                    "tiny_layers_per_block": 2,
                }
            )
        else:
            bm = s.base_model
        res = s.dreambooth.resolution
        build_tiny_pipeline(bm, res).save_pretrained(base, safe_serialization=True)
        rng = np.random.default_rng(0)
        inst = rng.integers(0, 255, (64, res, res), dtype=np.uint8)
        cls = rng.integers(0, 255, (32, res, res), dtype=np.uint8)
        db = s.dreambooth.model_copy(
            update={"max_train_steps": steps, "checkpointing_steps": 0, "lr_warmup_steps": 0, **options}
        )
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        steady, _ = timed_dreambooth(base, inst, cls, db, device)
        peak = (
            torch.cuda.max_memory_allocated() / 2**20
            if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        queue.put((name, steady, peak, device, torch.get_num_threads()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--sd21", action="store_true", help="SD-2.1-shaped model at 512 px (GPU only)")
    args = parser.parse_args()
    try:
        import bitsandbytes  # noqa: F401

        has_bnb = True
    except ImportError:
        has_bnb = False
    ctx = mp.get_context("spawn")
    print(
        f"DreamBooth, {'SD-2.1-shaped' if args.sd21 else 'demo tiny'} model, "
        f"{args.steps} steps per configuration"
    )
    print(f"{'configuration':42s} {'steps/s':>8s} {'peak MiB':>9s}  device")
    for name, options in CONFIGS.items():
        if options.get("use_8bit_adam") and not has_bnb:
            print(f"{name:42s} {'-':>8s} {'-':>9s}  skipped: bitsandbytes not installed (CUDA only)")
            continue
        queue: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=_run, args=(name, options, args.steps, queue, args.sd21))
        proc.start()
        proc.join()
        if proc.exitcode:
            print(f"{name:42s} failed (exit {proc.exitcode})")
            continue
        _, rate, peak, device, threads = queue.get()
        print(f"{name:42s} {rate:8.2f} {peak:9.0f}  {device} ({threads} threads)")
    print("peak memory: CUDA max allocated on a GPU; the process's peak resident set on the CPU.")


if __name__ == "__main__":
    main()
