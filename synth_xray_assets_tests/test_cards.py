"""One GPU step per card (``cards.py``, ``ComputeResource.holding_a_card``, ``on_a_card``) and the gpu
pool's limit following the cards (``operations/pools.py``), on the CPU with fake cards."""

import fcntl
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

import synth_xray_assets.cards as cards_module
from synth_xray_assets.cards import (
    CardConfig,
    CardLocks,
    CardsBusyError,
    card_key,
    card_of,
    held_cards,
    lock_file,
    physical_index,
)
from synth_xray_assets.deployment import GPU_POOL
from synth_xray_assets.operations.pools import follow_the_cards
from synth_xray_assets.resources import ComputeResource, SettingsResource, on_a_card
from synth_xray_assets.settings import Settings

GIB = 1024**3


@pytest.fixture(autouse=True)
def no_card_held_last():
    """Each test starts as a fresh process would: no card held before (``cards._last``)."""
    cards_module._last.clear()
    yield
    cards_module._last.clear()


def fake_cards(n: int = 2) -> list[CardConfig]:
    return [CardConfig(index=i, name=f"Fake {i}", total_memory=16 * GIB, key=f"fake-{i}") for i in range(n)]


# ---- the lock file names the physical card


def test_the_key_is_the_uuid_when_torch_gives_one():
    assert card_key("5a1b-77", "node-3", "1") == "GPU-5a1b-77"
    assert card_key("GPU-5a1b-77", "node-3", "1") == "GPU-5a1b-77"  # nvidia-smi's spelling kept


def test_without_uuid_the_key_is_the_host_and_physical_index():
    assert card_key(None, "node-3", "2") == "node-3-gpu2"
    assert physical_index(0, None) == "0"
    assert physical_index(1, "2,3") == "3"  # CUDA_VISIBLE_DEVICES=2,3: local 1 is physical 3
    assert physical_index(0, "GPU-abc, GPU-def") == "GPU-abc"


def test_a_card_from_torch_properties_under_visible_devices(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    props = SimpleNamespace(name="Fake H100", total_memory=80 * GIB)
    no_uuid = card_of(props, 1)
    assert no_uuid.key.endswith("-gpu3") and no_uuid.index == 1
    with_uuid = card_of(SimpleNamespace(**vars(props), uuid="0f-1e"), 1)
    assert with_uuid.key == "GPU-0f-1e"
    assert lock_file(tmp_path, with_uuid) == tmp_path / "GPU-0f-1e.lock"
    odd = CardConfig(index=0, name="x", total_memory=1, key="a b/c")
    assert lock_file(tmp_path, odd).name == "a_b_c.lock"


# ---- waiting and giving up


def test_the_timeout_error_names_the_busy_cards(tmp_path):
    cards = fake_cards(2)
    fds = [os.open(lock_file(tmp_path, c), os.O_RDWR | os.O_CREAT) for c in cards]
    try:
        for fd in fds:  # another holder (its own open file description) holds both cards
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lines: list[str] = []
        locks = CardLocks(tmp_path, wait_s=0.3, poll_s=0.05, log=lines.append)
        with pytest.raises(CardsBusyError) as err, locks.hold(cards, {"run_id": "r"}):
            pass
    finally:
        for fd in fds:
            os.close(fd)
    message = str(err.value)
    assert "fake-0" in message and "fake-1" in message and "operations.card_wait_s" in message
    assert len(lines) == 1 and lines[0].startswith("cards: waiting for a free card")
    assert held_cards() == ()


def test_a_free_card_is_taken_at_once_and_released(tmp_path):
    lines: list[str] = []
    locks = CardLocks(tmp_path, wait_s=1, poll_s=0.05, log=lines.append)
    with locks.hold(fake_cards(2), {"run_id": "r"}) as held:
        assert [c.key for c in held] == ["fake-0"] and held_cards() == tuple(held)
        with locks.hold(fake_cards(2), {}) as again:  # re-entrant in one process
            assert again == held
    assert held_cards() == () and lines == []


def test_a_process_takes_the_card_it_held_last_again(tmp_path):
    # Its CUDA context and cached memory are on that card: the next step of the same process
    # (the demo's partition processes, in-process runs) must not move to another one.
    locks = CardLocks(tmp_path, wait_s=1, poll_s=0.05, log=print)
    fd = os.open(lock_file(tmp_path, fake_cards(2)[0]), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # card 0 busy elsewhere
    with locks.hold(fake_cards(2), {}) as held:
        assert held[0].key == "fake-1"
    os.close(fd)  # card 0 free again
    with locks.hold(fake_cards(2), {}) as held:
        assert held[0].key == "fake-1"  # both free: the card this process held last


def test_more_cards_keep_a_usable_count_and_give_the_rest_back(tmp_path):
    """A data-parallel step on 5 cards, two busy elsewhere, wanting 4 (ranks 1, 2 or 4): it holds
    its own and takes the 2 free, but 3 ranks do not divide the batch, so it keeps 1 extra (2 ranks)
    and gives the other back at once; on leaving, its extra card is free and its holder text gone."""
    cards = fake_cards(5)
    locks = CardLocks(tmp_path, wait_s=1, poll_s=0.05, log=print)
    busy = [os.open(lock_file(tmp_path, c), os.O_RDWR | os.O_CREAT) for c in cards[3:]]
    for fd in busy:
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with locks.hold(cards, {"run_id": "r"}) as own:
            with locks.more(cards, 3, {"run_id": "r", "step": "dreambooth"}, totals=[1, 2, 4]) as extra:
                assert [c.key for c in own + extra] == ["fake-0", "fake-1"]
                assert [c.key for c in held_cards()] == ["fake-0", "fake-1"]
                fd = os.open(lock_file(tmp_path, cards[2]), os.O_RDWR | os.O_CREAT)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # given back: another step takes it now
                os.close(fd)
                assert lock_file(tmp_path, cards[2]).read_text() == ""  # no holder left in it
            assert [c.key for c in held_cards()] == ["fake-0"]
            assert [c.key for c in cards_module.cards_used()] == ["fake-0", "fake-1"]  # its metadata
        assert lock_file(tmp_path, cards[1]).read_text() == ""
    finally:
        for fd in busy:
            os.close(fd)


def test_a_generation_step_of_two_takes_at_most_half_the_cards():
    assert ComputeResource(cards=fake_cards(8)).share_of_cards(2) == 4
    assert ComputeResource(cards=fake_cards(1)).share_of_cards(2) == 1  # at least its own
    assert ComputeResource().share_of_cards(2) == 1  # no card here: one device


# ---- ComputeResource


def test_a_cpu_only_machine_changes_nothing(tmp_path):
    compute = ComputeResource()
    assert compute.machine_cards() == []  # no CUDA here, none injected
    with compute.holding_a_card(Settings.for_profile("demo", tmp_path), {}, print) as held:
        assert held == [] and compute.resolve_device() == "cpu"
    assert not (tmp_path / "locks").exists()


def test_a_cpu_device_takes_no_card_even_with_cards():
    assert ComputeResource(device="cpu", cards=fake_cards()).machine_cards() == []
    assert len(ComputeResource(cards=fake_cards()).machine_cards()) == 2


def test_a_held_card_is_the_device_on_cuda(tmp_path, monkeypatch):
    import torch

    current: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    compute = ComputeResource(cards=fake_cards(2)[1:])  # this process sees card 1 only free
    assert compute.resolve_device() == "cuda"  # no card held: as before
    with compute.holding_a_card(Settings.for_profile("demo", tmp_path), {}, print) as held:
        assert [c.index for c in held] == [1]
        assert compute.resolve_device() == "cuda:1" and current == [1]
    assert ComputeResource(device="cuda:0").resolve_device() == "cuda:0"  # a device set by hand stays


def test_a_step_on_a_card_records_it_in_its_metadata(tmp_path):
    s = Settings.for_profile("demo", tmp_path)

    @dg.asset(pool=GPU_POOL)
    @on_a_card
    def step(context, settings: SettingsResource, compute: ComputeResource) -> dg.MaterializeResult:
        assert [c.key for c in held_cards()] == ["fake-0"]
        assert compute.resolve_device() == "cpu"  # fake cards on a machine without CUDA
        return dg.MaterializeResult(metadata={"own": 1})

    result = dg.materialize(
        [step], resources={"settings": SettingsResource.of(s), "compute": ComputeResource(cards=fake_cards())}
    )
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["own"].value == 1
    assert meta["gpu_cards"].value == [
        {"index": 0, "name": "Fake 0", "key": "fake-0", "total_gib": 16.0, "peak_gib": None}
    ]
    assert meta["ran_on"].value == "cpu: Fake 0 (fake-0)"
    assert held_cards() == ()


# ---- three step processes, two cards

STEP = textwrap.dedent(
    """
    import sys, time
    from synth_xray_assets.cards import CardConfig
    from synth_xray_assets.resources import ComputeResource
    from synth_xray_assets.settings import Settings

    s = Settings.for_profile(
        "demo", sys.argv[1], {"operations": {"card_wait_s": 60, "card_poll_s": 0.1}}
    )
    cards = [CardConfig(index=i, name=f"Fake {i}", total_memory=2**34, key=f"fake-{i}") for i in range(2)]
    log = lambda line: print(line, flush=True)
    with ComputeResource(cards=cards).holding_a_card(s, {"run_id": sys.argv[2]}, log) as held:
        print("HELD", held[0].key, flush=True)
        time.sleep(120)
    """
)


class Step:
    """One step process; its output lines arrive on a queue."""

    def __init__(self, script: Path, data: Path, name: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(data), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting {prefix!r} within {timeout} s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def test_three_steps_on_two_cards_never_share_one(tmp_path):
    script = tmp_path / "step.py"
    script.write_text(STEP)
    data = tmp_path / "data"
    a, b = Step(script, data, "run-a"), Step(script, data, "run-b")
    steps = [a, b]
    try:
        key_a, key_b = a.wait_for("HELD").split()[1], b.wait_for("HELD").split()[1]
        assert {key_a, key_b} == {"fake-0", "fake-1"}
        c = Step(script, data, "run-c")
        steps.append(c)
        waiting = c.wait_for("cards: waiting")
        assert "fake-0" in waiting and "fake-1" in waiting and "run run-a" in waiting
        time.sleep(0.5)
        assert all(not line.startswith("HELD") for line in list(c.lines.queue))
        a.kill()  # SIGKILL: the kernel frees its card, no person needed
        assert c.wait_for("HELD", timeout=20) == f"HELD {key_a}"
    finally:
        for step in steps:
            step.kill()


# ---- the gpu pool's limit


def _limit(instance) -> int | None:
    return instance.event_log_storage.get_concurrency_info(GPU_POOL).limit


def test_the_gpu_pool_limit_follows_the_cards():
    with dg.instance_for_test() as instance:
        follow_the_cards(instance, 0)
        assert _limit(instance) == 1  # no card: still one step at a time
        follow_the_cards(instance, 4)
        assert _limit(instance) == 4
        follow_the_cards(instance, 2)  # a limit this code set follows the cards again
        assert _limit(instance) == 2


def test_a_limit_set_by_hand_is_kept():
    with dg.instance_for_test() as instance:
        follow_the_cards(instance, 2)
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 5)  # dagster instance concurrency set
        said = follow_the_cards(instance, 3)
        assert _limit(instance) == 5 and "by hand" in said
    with dg.instance_for_test() as instance:
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 7)  # before this code ever ran
        follow_the_cards(instance, 3)
        assert _limit(instance) == 7


def test_the_shipped_run_limit_rises_to_a_run_per_card(tmp_path):
    """``make dev`` on 4 cards: the shipped instance's 2 runs at once become 5 (a run per card and
    one on the CPU), as the instance reads it; the rest of the file is kept; never lowered."""
    from pathlib import Path

    from synth_xray_assets.operations.pools import runs_for_the_cards

    shipped = (Path(__file__).parents[1] / "dagster.yaml").read_text()
    config = tmp_path / "dagster.yaml"
    config.write_text(shipped)
    assert "left as it is" in runs_for_the_cards(config, 0)  # a CPU machine: 2 stays
    assert config.read_text() == shipped
    assert "at most 5 at once" in runs_for_the_cards(config, 4)
    text = config.read_text()
    assert text.replace("max_concurrent_runs: 5", "max_concurrent_runs: 2") == shipped
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 5
    runs_for_the_cards(config, 2)  # fewer cards later: not lowered
    assert config.read_text() == text
    config.write_text(shipped.replace("max_concurrent_runs: 2", "max_concurrent_runs: -1"))
    assert "left as it is" in runs_for_the_cards(config, 8)  # no limit stays no limit


def test_the_full_study_runs_a_stages_partitions_one_per_card(monkeypatch):
    from synth_xray_assets import demo

    running, most, ran, lock = [0], [0], [], threading.Lock()

    def child(name, key):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
            ran.append(key)
        return f"stage {name} [{key}] failed" if key == "c" else None

    monkeypatch.setattr(demo, "stage_keys", lambda instance, name: ["a", "b", "c", "d", "e"])
    monkeypatch.setattr(demo, "run_in_child", child)
    failures = demo.run_stage(None, "classifier_job", parallel=2)
    assert sorted(ran) == ["a", "b", "c", "d", "e"]  # a failure does not stop the others
    assert most[0] == 2
    assert failures == ["stage classifier_job [c] failed"]
    with pytest.raises(SystemExit, match=r"classifier_job \[c\] failed(.|\n)*run `make demo` again"):
        demo.run_pipeline(None, ["classifier_job"], parallel=2)


def test_a_partition_runs_in_its_own_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTH_XRAY_", "DAGSTER_"))}
    env.update(SYNTH_XRAY_PROFILE="demo", SYNTH_XRAY_DATA=str(tmp_path / "data"), DAGSTER_HOME=str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    def child(job: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "synth_xray_assets.demo", "--partition", job, ""]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)

    observed = child("observe_source_job")
    assert observed.returncode == 0, observed.stderr[-3000:]
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        runs = instance.get_runs()
    assert [r.job_name for r in runs] == ["observe_source_job"] and runs[0].is_success
    missing = child("no_such_job")
    assert missing.returncode != 0 and "no_such_job" in missing.stderr
