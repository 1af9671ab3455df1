"""The README is tested: every ```python block runs, in order, as a user would paste it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from exdrop.layer_types import REGISTRY, TORCH_MODULES

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i):
    saved = dict(REGISTRY), dict(TORCH_MODULES)
    try:
        exec(compile(BLOCKS[i], f"README.md python block {i + 1}", "exec"), {"__name__": "readme"})
    finally:  # a block may register a layer type; the table goes back as it was
        REGISTRY.clear(), REGISTRY.update(saved[0])
        TORCH_MODULES.clear(), TORCH_MODULES.update(saved[1])


def test_module_docstring_examples_run():
    """The Examples sections of the drop-in modules' docstrings (torch.nn style) run as written."""
    import doctest

    import torch

    import exdrop.nn

    torch.manual_seed(0)
    res = doctest.testmod(exdrop.nn, extraglobs={"torch": torch, "nn": torch.nn}, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 7 and res.failed == 0, res
