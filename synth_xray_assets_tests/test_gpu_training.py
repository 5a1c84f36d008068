"""GPU training on the CPU: mixed-precision choice, the out-of-memory fallback, loader workers."""

from pathlib import Path

import pytest
import torch
from torch import nn

from synth_xray_assets.classifier.checkpoint import CheckpointSaver, Progress, TrainingParts
from synth_xray_assets.classifier.step import (
    BATCHNORM_NOTE,
    MicroBatchStep,
    choose_precision,
    oom_note,
)
from synth_xray_assets.hardware import available_cpus, loader_workers
from synth_xray_assets.settings import ClassifierSettings

# No augmentation: the step's numbers then depend on the model and the micro-batch only.
PLAIN = {"hflip": False, "rotation_degrees": 0.0, "brightness": 0.0, "contrast": 0.0, "batch_size": 16}


class OutOfMemoryAbove(nn.Module):
    """A model without batch-dependent layers that raises CUDA's out-of-memory error on big inputs."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.calls = limit, []
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.net(x)


def _step(model: nn.Module, settings: ClassifierSettings, log=lambda m: None) -> MicroBatchStep:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return MicroBatchStep(model, optimizer, settings, choose_precision("cpu", "auto"), "cpu", log)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_batch_update():
    settings = ClassifierSettings(**PLAIN)
    torch.manual_seed(0)
    big = OutOfMemoryAbove(limit=10**6)
    small = OutOfMemoryAbove(limit=5)
    small.load_state_dict(big.state_dict())
    x = torch.randint(0, 256, (16, 12, 12), dtype=torch.uint8)
    y = torch.randint(0, 2, (16,))
    messages: list[str] = []
    one_batch, micro = _step(big, settings), _step(small, settings, messages.append)
    a, b = one_batch(x, y), micro(x, y)
    # 16 fails, 8 fails, then 4 + 4 + 4 + 4: the micro-batch is 4 and stays there.
    assert small.calls == [16, 8, 4, 4, 4, 4] and micro.micro_batch == 4 and micro.oom_events == 2
    assert "micro-batch halved to 4" in messages[-1] and "batch of 16" in messages[-1]
    # The same optimizer step as one batch of 16: loss weighting by images, not by micro-batch.
    for p, q in zip(big.parameters(), small.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert a.images == b.images == 16 and a.correct == b.correct
    assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-5)
    small.calls.clear()
    micro(x[:11], y[:11])  # a short last batch: 4 + 4 + 3, each image still weighs 1/11
    assert small.calls == [4, 4, 3]
    note = oom_note(micro)
    assert note["micro_batch"] == 4 and note["gradient_accumulation"] == 4 and note["batch_size"] == 16
    assert note["batchnorm_note"] == BATCHNORM_NOTE
    assert oom_note(one_batch)["batchnorm_note"] == ""


def test_out_of_memory_at_a_micro_batch_of_one_is_a_clear_error():
    model = OutOfMemoryAbove(limit=0)
    with pytest.raises(torch.OutOfMemoryError, match="micro-batch of 1.*batch_size"):
        _step(model, ClassifierSettings(**PLAIN))(
            torch.zeros(16, 8, 8, dtype=torch.uint8), torch.zeros(16, dtype=torch.long)
        )


def test_mixed_precision_on_cuda_only_bf16_where_supported():
    for wanted in ("auto", "bf16", "fp16", "no"):
        cpu = choose_precision("cpu", wanted, bf16_supported=True)
        assert cpu.dtype is None and not cpu.grad_scaler and cpu.label == "fp32"
    assert choose_precision("cuda", "auto", bf16_supported=True).dtype == torch.bfloat16
    fp16 = choose_precision("cuda:0", "auto", bf16_supported=False)
    assert fp16.dtype == torch.float16 and fp16.grad_scaler  # fp16 needs loss scaling
    assert not choose_precision("cuda", "bf16", bf16_supported=True).grad_scaler
    assert choose_precision("cuda", "no", bf16_supported=True).label == "fp32"
    with pytest.raises(ValueError, match="does not support bf16"):
        choose_precision("cuda", "bf16", bf16_supported=False)
    with pytest.raises(ValueError, match="mixed_precision"):
        choose_precision("cuda", "fp8")


def test_a_cpu_step_runs_in_fp32():
    seen: list[torch.dtype] = []
    model = OutOfMemoryAbove(limit=100)
    model.net[-1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    step = _step(model, ClassifierSettings(**PLAIN))
    step(torch.zeros(4, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    assert seen == [torch.float32] and not step.scaler.is_enabled()


def test_loader_workers_from_the_cores_available(tmp_path: Path):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # a container limited to 1.5 cores
    assert available_cpus(quota) == 1
    quota.write_text("max 100000\n")
    assert available_cpus(quota) == available_cpus(tmp_path / "missing") >= 1
    assert loader_workers(torch_threads=1, cpus=2) == 1
    assert loader_workers(torch_threads=4, cpus=16) == 8  # capped
    assert loader_workers(torch_threads=8, cpus=4) == 1


def test_checkpoint_saver_resumes_only_its_own_run(tmp_path: Path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3)
    step = _step(model, ClassifierSettings(**PLAIN))
    parts = TrainingParts(model, optimizer, scheduler, step, "cpu")
    saver = CheckpointSaver(tmp_path, "fp-1", {"experiment": "x"})
    progress = Progress(epoch=2, history=[{"epoch": 1}, {"epoch": 2}], best_key=(0.5, 0.1), best_epoch=1)
    saver.save_best(model, 1)
    saver.save_state(parts, progress)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    logs: list[str] = []
    again = CheckpointSaver(tmp_path, "fp-1", {}).resume(parts, logs.append)
    assert again.epoch == 2 and again.best_epoch == 1 and again.best_key == (0.5, 0.1)
    assert CheckpointSaver(tmp_path, "fp-2", {}).resume(parts, logs.append).epoch == 0
    saver.save_best(model, 2)  # a crash after the best weights, before the state: start afresh
    assert CheckpointSaver(tmp_path, "fp-1", {}).resume(parts, logs.append).epoch == 0
    assert all("starting afresh" in m for m in logs)
