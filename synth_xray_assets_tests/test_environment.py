"""One locked environment: requirements.lock (make install, CI) and deploy/requirements.lock (the
image) pin every package, match pyproject.toml, and a stale lock fails ``make lock-check`` naming
the command that refreshes it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from servers import REPO, unavailable

LOCKS = ("requirements.lock", "deploy/requirements.lock")
UV = Path(sys.executable).with_name("uv")


def _lock_check(root: Path) -> subprocess.CompletedProcess:
    if not UV.exists():
        unavailable(f"uv is not installed beside {sys.executable} (make install installs it)")
    return subprocess.run(
        ["make", "-s", "lock-check", f"UV={UV}", f"PY={sys.executable}"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _pins(lock: str) -> dict[str, Requirement]:
    lines = (REPO / lock).read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def test_every_locked_package_has_one_exact_version_and_the_image_shares_the_tested_pins():
    dev, image = _pins(LOCKS[0]), _pins(LOCKS[1])
    for name, req in {**dev, **image}.items():
        (spec,) = req.specifier
        assert spec.operator == "==", (name, str(req))
    assert {"torch", "dagster", "sqlalchemy", "kubernetes", "celery", "pytest"} <= set(dev)
    assert "bitsandbytes" in image and "pytest" not in image
    shared = set(dev) & set(image)
    assert {n for n in shared if dev[n].specifier != image[n].specifier} == set()


def test_the_locks_match_pyproject():
    done = _lock_check(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_a_lock_out_of_date_with_pyproject_fails_naming_make_lock(tmp_path):
    for name in ("Makefile", "pyproject.toml", *LOCKS):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "tools", tmp_path / "tools")
    pyproject = (tmp_path / "pyproject.toml").read_text()
    added = '    "pytest==9.2.0",\n    "uv==0.13.9",\n'
    assert '    "pytest==9.2.0",\n' in pyproject
    (tmp_path / "pyproject.toml").write_text(pyproject.replace('    "pytest==9.2.0",\n', added))
    done = _lock_check(tmp_path)
    assert done.returncode != 0
    assert "+uv==0.13.9" in done.stdout and "run make lock" in done.stdout, done.stdout[-2000:]


@pytest.mark.parametrize("lock", LOCKS)
def test_the_lock_is_what_the_installs_read(lock):
    makefile = (REPO / "Makefile").read_text()
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    if lock == LOCKS[0]:
        assert "LOCK := requirements.lock" in makefile
        assert makefile.count("--no-deps -r $(LOCK) -e .") == 2  # the uv and the pip path
    else:
        assert "COPY deploy/requirements.lock ./" in dockerfile
        assert "--no-deps -r requirements.lock" in dockerfile
