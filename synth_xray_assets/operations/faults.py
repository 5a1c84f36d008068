"""Fault injection for the crash-safety tests: freeze the process at a named point to be killed.

Off unless ``$SYNTH_XRAY_FAULT_PLAN`` names a plan file: a JSON list of
``{"point": name, "match": substring of the detail, "hit": n}``, fired one after the other.
When the first entry not yet fired is reached for the ``hit``-th time in this process (counting
only calls whose detail contains ``match``), a marker ``fired/{i}.json`` (pid, point, detail) is
written beside the plan and the process freezes there, to be killed with SIGKILL by the test.
An entry with ``"pause_s": t`` instead pauses ``t`` seconds and goes on (an orphaned step would
then carry on: the test of ``lifetime.py`` kills the run worker in that pause); one with
``"raise": "out_of_memory"`` raises torch's out-of-memory error there, as a full card would.
Points: ``write`` (inside every atomic write, the temporary complete, before the rename; the
detail is the destination), ``dreambooth.step`` and ``classifier.epoch`` (after each step or
epoch, before its state is saved; the detail of ``dreambooth.step`` is ``"<step> rank <r>"``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

PLAN_ENV = "SYNTH_XRAY_FAULT_PLAN"
FREEZE_S = 600.0  # the test kills well before; a forgotten freeze ends by killing itself

_hits: Counter[int] = Counter()


def fault_point(point: str, detail: str = "") -> None:
    """Freeze here if the fault plan says so (a no-op without ``$SYNTH_XRAY_FAULT_PLAN``)."""
    plan_file = os.environ.get(PLAN_ENV)
    if not plan_file:
        return
    plan = json.loads(Path(plan_file).read_text())
    fired = Path(plan_file).parent / "fired"
    current = next((i for i in range(len(plan)) if not (fired / f"{i}.json").exists()), None)
    if current is None:
        return
    entry = plan[current]
    if entry["point"] != point or entry.get("match", "") not in detail:
        return
    _hits[current] += 1
    if _hits[current] != entry["hit"]:
        return
    fired.mkdir(exist_ok=True)
    marker = {"pid": os.getpid(), "point": point, "detail": detail, "hit": entry["hit"], "time": time.time()}
    tmp = fired / f".{current}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(marker))
    os.replace(tmp, fired / f"{current}.json")
    if "pause_s" in entry:
        time.sleep(float(entry["pause_s"]))
        return
    if entry.get("raise") == "out_of_memory":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {point} {detail})")
    time.sleep(FREEZE_S)
    os.kill(os.getpid(), signal.SIGKILL)
