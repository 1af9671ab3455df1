"""Installable: the wheel, installed into a fresh virtual environment outside the repository,
gives a working ``exdrop`` command that trains a shipped prototxt, and the drop-in modules.

The fresh environment gets the project's dependencies (torch, protobuf, ...) from the test's own
environment through a path file, without its packages' start-up hooks: so the project's editable
install is not visible there, only the wheel is."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("exdrop", "prototxt", "layers", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md")


def _run(cmd, cwd, env=None, timeout=600):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    """(bin folder of a fresh venv with the wheel installed, a working folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"   # a clean copy: no build/ leftovers of the checkout reach the wheel
    for name in SOURCES:
        s = ROOT / name
        (shutil.copytree(s, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
         if s.is_dir() else shutil.copy2(s, src / name))
    env = _clean_env()   # with the checkout on PYTHONPATH, pip would take the wheel as installed already
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
          str(src)], cwd=tmp, env=env)
    wheel = next((tmp / "dist").glob("exdrop-*.whl"))
    venv = tmp / "venv"
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "project_dependencies.pth").write_text("\n".join(deps) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
          "--no-index", str(wheel)], cwd=tmp, env=env)
    work = tmp / "work"
    work.mkdir()
    return venv / "bin", work


def _clean_env():
    """The environment without what points at the checkout (tests/conftest.py sets PYTHONPATH to it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EXDROP_HOME", "VIRTUAL_ENV")}
    return env


def test_the_drop_in_module_imports_from_the_wheel(fresh_env):
    bin_dir, work = fresh_env
    done = _run([str(bin_dir / "python"), "-c", "import exdrop, exdrop.nn; from exdrop.nn import ExcitationDropout; "
                 "from exdrop.paths import REPO_ROOT; print(exdrop.__file__); print(REPO_ROOT)"], cwd=work,
                env=_clean_env())
    package, home = done.stdout.split()
    assert not Path(package).resolve().is_relative_to(ROOT), package   # the wheel's copy, not the checkout
    assert Path(home).name == "_shipped" and (Path(home) / "prototxt/cnn2/cifar10/solver_ed.prototxt").is_file()


def test_the_exdrop_command_trains_a_shipped_prototxt(fresh_env):
    """`exdrop train` of the shipped CIFAR-10 ED solver, one iteration, from a folder outside the
    checkout, on a small generated image tree (converted into the folder's data/cifar10)."""
    bin_dir, work = fresh_env
    tree = work / "images"
    rng = np.random.default_rng(0)
    for c in range(10):
        (tree / f"class{c}").mkdir(parents=True)
        for i in range(12):
            cv2.imwrite(str(tree / f"class{c}" / f"{i}.png"), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    shipped = _run([str(bin_dir / "python"), "-c", "from exdrop.paths import PROTOTXT; print(PROTOTXT)"], cwd=work,
                   env=_clean_env()).stdout.strip()
    solver = Path(shipped) / "cnn2/cifar10/solver_ed.prototxt"
    done = _run([str(bin_dir / "exdrop"), "train", str(solver), "--data", str(tree), "--max-iter", "1",
                 "--test-iter", "1", "--out", "run", "--device", "cpu", "--quiet"], cwd=work, env=_clean_env())
    import json
    res = json.loads((work / "run" / "results.json").read_text())
    assert (res["status"], res["iterations"]) == ("finished", 1), done.stdout + done.stderr
    assert res["guided_layers"] == ["drop"]   # the ED layer of the shipped net, loaded from the shipped layers/
    assert Path(res["net"]).resolve().is_relative_to(Path(shipped).resolve())   # the shipped net, found from the solver


def test_a_tests_subprocess_imports_the_checkout_under_test(tmp_path):
    """tests/conftest.py: a subprocess started from another folder imports this checkout's exdrop
    (a worktree's, or mutmut's mutated copy), never the one the editable install points at."""
    import exdrop
    out = subprocess.run([sys.executable, "-c", "import exdrop, layers; print(exdrop.__file__); print(layers.__path__[0])"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert Path(out[0]).resolve() == Path(exdrop.__file__).resolve()
    assert Path(out[1]).resolve() == Path(exdrop.__file__).resolve().parent.parent / "layers"
