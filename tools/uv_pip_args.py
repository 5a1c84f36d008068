"""Print pip's configured package sources and constraints as ``uv pip install`` arguments.

uv reads neither ``pip.conf`` nor ``PIP_*`` variables, so without this it would resolve against
PyPI alone and ignore pip's constraints (here: local mirrors of the pinned torch and a constraint
file capping it). ``make install`` passes the printed arguments to uv so that both installers see
the same sources; ``benchmarks/install.py`` compares them that way.

    python tools/uv_pip_args.py          # e.g. --index-strategy unsafe-best-match --extra-index-url ...
"""

from __future__ import annotations

import shlex
import subprocess
import sys

# pip option -> uv pip option; values split on whitespace as pip does for list options.
OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraints",
}


def pip_config(python: str = sys.executable) -> dict[str, str]:
    """pip's effective settings (``pip config list``); environment variables win over files."""
    out = subprocess.run(
        [python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.partition(".")
        target = env if section == ":env:" else files
        target[name] = value.strip().strip("'\"")
    return {**files, **env}


def uv_args(config: dict[str, str]) -> list[str]:
    """The ``uv pip install`` arguments that give uv the sources and constraints pip has."""
    # pip takes the best version across every index; uv by default stops at the first index
    # that has the package.
    args = ["--index-strategy", "unsafe-best-match"]
    for name, option in OPTIONS.items():
        for value in config.get(name, "").split():
            args += [option, value]
    if config.get("cert"):
        args.append("--system-certs")  # pip's CA bundle is the system's
    return args


if __name__ == "__main__":
    print(shlex.join(uv_args(pip_config(sys.argv[1] if len(sys.argv) > 1 else sys.executable))))
