"""Subprocesses that a test starts (``python -m exdrop``, sweep drivers, torchrun) import the
same exdrop as the test itself: the checkout under test, not whichever one the editable install
points at. In a git worktree that is the worktree's code; under ``make mutation`` it is the
mutated copy, so a mutant that only a subprocess exercises is killed rather than missed."""
import os
from pathlib import Path

import pytest

import exdrop

CHECKOUT = str(Path(exdrop.__file__).resolve().parent.parent)


@pytest.fixture(autouse=True, scope="session")
def subprocesses_import_this_checkout():
    # mutmut's coverage pass ("stats") records which tests reach which function in this process
    # only; a subprocess's hits would be lost, so it keeps the unmutated import there.
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        yield
        return
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([CHECKOUT] + ([before] if before else []))
    yield
    if before is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = before
