"""The README's main job runs with only what `pip install -e .` installs.

CI installs the `dev` extra, so a package that the main job needs but only `dev` brings in passes every
other test and still breaks `pip install -e . && peftfast train` on a fresh machine (accelerate was one:
transformers needs it for the device_map of every 4-bit load). This test builds that fresh install out of
this environment: a directory of links to the runtime dependencies of peftfast and their own
dependencies, nothing else, and runs a short main job in an interpreter that sees only that directory
and the standard library. Optional imports (scipy, boto3, ...) fail there as they would on the fresh
machine, and must not matter.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _runtime_requirements() -> list:
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def _closure(requirements: list) -> dict:
    """The installed distributions the requirements pull in, by normalized name (markers evaluated, no extras)."""
    from packaging.requirements import Requirement

    found, todo = {}, list(requirements)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if _norm(req.name) in found:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            pytest.skip(f"{req.name} is not installed here, so a fresh install cannot be mimicked")
        found[_norm(req.name)] = dist
        todo.extend(dist.requires or [])
    return found


def _link_install(dists: dict, site: Path) -> None:
    """Link each distribution's top-level files and folders into ``site``, and peftfast as `pip install -e .`
    maps it (kernels/ becomes peftfast.kernels)."""
    for dist in dists.values():
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
    pkg = site / "peftfast"
    pkg.mkdir()
    for entry in (ROOT / "peftfast").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    (pkg / "kernels").symlink_to(ROOT / "kernels")


def test_main_job_runs_on_the_runtime_dependencies_alone(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _link_install(_closure(_runtime_requirements()), site)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(site)
    # -S: no site-packages of this environment (so no dev extras); -E is not used, PYTHONPATH must count.
    proc = subprocess.run(
        [sys.executable, "-S", "-m", "peftfast", "train", "--max-steps", "2", "--output", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, (
        "the main job fails with only peftfast's runtime dependencies installed; a package it needs is "
        f"missing from [project] dependencies in pyproject.toml:\n{proc.stderr[-3000:]}")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
