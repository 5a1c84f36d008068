"""Fresh-clone set-up time: pip (the plain way) against uv, in one run, with the same sources.

Clones the repository's committed HEAD into a scratch folder and times what ``make install`` does
there with each installer, each with a cold cache (a fresh cache folder) and then warm (the same
cache again, into a new virtual environment):

- pip: ``python3 -m venv .venv``, ``pip install --upgrade pip``, ``pip install -e '.[dev]'``;
- uv: ``python3 -m venv .venv``, ``pip install uv``, ``uv pip install -e '.[dev]'`` with pip's
  configured indexes, find-links and constraints passed on (``tools/uv_pip_args.py``): uv reads
  neither pip.conf nor ``PIP_*``, and on its own would resolve torch from PyPI (a CUDA build with
  several GB of nvidia wheels) where pip takes the pinned wheels from the local mirrors.

Each virtual environment is deleted after it is timed (they are several GB each).

    .venv/bin/python benchmarks/install.py [--work /tmp/install-bench] [--uv-version 0.13.9]
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


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def pip_way(clone: Path, env: dict[str, str]) -> None:
    run(["python3", "-m", "venv", ".venv"], clone, env)
    run([".venv/bin/python", "-m", "pip", "install", "-q", "--upgrade", "pip"], clone, env)
    run([".venv/bin/python", "-m", "pip", "install", "-q", "-e", ".[dev]"], clone, env)


def uv_way(clone: Path, env: dict[str, str], uv_version: str, extra: list[str]) -> None:
    run(["python3", "-m", "venv", ".venv"], clone, env)
    run([".venv/bin/python", "-m", "pip", "install", "-q", f"uv=={uv_version}"], clone, env)
    cmd = [".venv/bin/uv", "pip", "install", "-q", "--python", ".venv/bin/python", *extra, "-e", ".[dev]"]
    run(cmd, clone, env)


def timed(label: str, fn, clone: Path, *args) -> float:
    shutil.rmtree(clone / ".venv", ignore_errors=True)
    start = time.perf_counter()
    fn(clone, *args)
    seconds = time.perf_counter() - start
    size = subprocess.run(["du", "-sh", str(clone / ".venv")], capture_output=True, text=True).stdout.split()[
        0
    ]
    print(f"{label:<28} {seconds:7.1f} s   (.venv {size})", flush=True)
    shutil.rmtree(clone / ".venv", ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--uv-version", default="0.13.9")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="install-bench-"))
    clone = work / "clone"
    shutil.rmtree(work / "clone", ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    extra = uv_args(pip_config("python3"))
    print(f"uv arguments from pip's config: {' '.join(extra)}")
    pip_env = {**os.environ, "PIP_CACHE_DIR": str(work / "pip-cache")}
    uv_env = {**pip_env, "UV_CACHE_DIR": str(work / "uv-cache")}
    shutil.rmtree(work / "pip-cache", ignore_errors=True)
    shutil.rmtree(work / "uv-cache", ignore_errors=True)
    results = {
        "pip, cold cache": timed("pip, cold cache", pip_way, clone, pip_env),
        "pip, warm cache": timed("pip, warm cache", pip_way, clone, pip_env),
        "uv, cold cache": timed("uv, cold cache", uv_way, clone, uv_env, args.uv_version, extra),
        "uv, warm cache": timed("uv, warm cache", uv_way, clone, uv_env, args.uv_version, extra),
    }
    for kind in ("cold", "warm"):
        p, u = results[f"pip, {kind} cache"], results[f"uv, {kind} cache"]
        print(
            f"{kind} cache: pip {p:.0f} s, uv {u:.0f} s: uv {p / u:.1f}x faster"
            if u < p
            else f"{kind} cache: pip {p:.0f} s, uv {u:.0f} s: pip faster"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
