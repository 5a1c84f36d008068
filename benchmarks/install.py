"""Fresh-clone set-up time: pip (the plain way) against uv, in one run, with the same sources.

Clones the repository's committed HEAD into a scratch folder and times ``make install`` there
with each installer, each with a cold cache (a fresh cache folder) and then warm (the same cache
again, into a new virtual environment):

- pip: ``make install INSTALLER=pip``: venv, ``pip install --upgrade pip``, ``pip install -e '.[dev]'``;
- uv (the default): venv, ``pip install uv``, ``uv pip install -e '.[dev]'`` with pip's configured
  indexes, find-links and constraints passed on (``tools/uv_pip_args.py``): uv reads neither
  pip.conf nor ``PIP_*``, and on its own would resolve torch from PyPI (a CUDA build with several
  GB of nvidia wheels) where pip takes the pinned wheels from the local mirrors;
- uv with ``--compile-bytecode``, as pip writes ``.pyc`` files while it installs.

Each environment is checked to import torch, dagster and the package (untimed), then deleted
(they are several GB each).

    .venv/bin/python benchmarks/install.py [--work /tmp/install-bench] [--skip-pip]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from uv_pip_args import pip_config, uv_args  # noqa: E402

CHECK = "import torch, torchvision, dagster, synth_xray_assets; print('torch', torch.__version__)"


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def pip_way(clone: Path, env: dict[str, str]) -> None:
    """``make install INSTALLER=pip``: venv, upgrade pip, ``pip install -e '.[dev]'``."""
    run(["make", "install", "INSTALLER=pip"], clone, env)


def uv_way(clone: Path, env: dict[str, str], uv_flags: str = "") -> None:
    """``make install``: venv, ``pip install uv``, ``uv pip install -e '.[dev]'`` with pip's sources."""
    run(["make", "install", f"UV_FLAGS={uv_flags}"], clone, env)


def timed(label: str, fn, clone: Path, *args) -> float:
    shutil.rmtree(clone / ".venv", ignore_errors=True)
    subprocess.run(["git", "-C", str(clone), "clean", "-qfdx"], check=True)
    start = time.perf_counter()
    fn(clone, *args)
    seconds = time.perf_counter() - start
    size = subprocess.run(["du", "-sh", str(clone / ".venv")], capture_output=True, text=True).stdout.split()
    versions = subprocess.run(  # untimed: the environment works and holds the pinned torch
        [str(clone / ".venv/bin/python"), "-c", CHECK], cwd=clone, capture_output=True, text=True, check=True
    ).stdout.strip()
    print(f"{label:<30} {seconds:7.1f} s   (.venv {size[0]}; {versions})", flush=True)
    shutil.rmtree(clone / ".venv", ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--skip-pip", action="store_true", help="time uv only (pip takes minutes)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="install-bench-"))
    clone = work / "clone"
    shutil.rmtree(work / "clone", ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    print(f"uv arguments from pip's config: {' '.join(uv_args(pip_config('python3')))}")
    pip_env = {**os.environ, "PIP_CACHE_DIR": str(work / "pip-cache")}
    uv_env = {**pip_env, "UV_CACHE_DIR": str(work / "uv-cache")}
    shutil.rmtree(work / "pip-cache", ignore_errors=True)
    shutil.rmtree(work / "uv-cache", ignore_errors=True)
    results = {}
    if not args.skip_pip:
        results["pip, cold cache"] = timed("pip, cold cache", pip_way, clone, pip_env)
        results["pip, warm cache"] = timed("pip, warm cache", pip_way, clone, pip_env)
    results["uv, cold cache"] = timed("uv, cold cache", uv_way, clone, uv_env)
    results["uv, warm cache"] = timed("uv, warm cache", uv_way, clone, uv_env)
    # pip writes .pyc files as it installs; uv leaves them to the first import unless asked.
    timed("uv --compile-bytecode, warm", uv_way, clone, uv_env, "--compile-bytecode")
    for kind in ("cold", "warm") if not args.skip_pip else ():
        p, u = results[f"pip, {kind} cache"], results[f"uv, {kind} cache"]
        print(
            f"{kind} cache: pip {p:.0f} s, uv {u:.0f} s: uv {p / u:.1f}x faster"
            if u < p
            else f"{kind} cache: pip {p:.0f} s, uv {u:.0f} s: pip faster"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
