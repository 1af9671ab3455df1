"""The README and docs/ are tested: every ```python block runs, in order, as a user would paste it;
every shell block is marked; every relative link points at a file that exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from exdrop.engine.layer_types import REGISTRY, TORCH_MODULES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
TEXT = "\n".join(p.read_text() for p in PAGES)
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


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

    import exdrop.engine.nn

    torch.manual_seed(0)
    res = doctest.testmod(exdrop.engine.nn, extraglobs={"torch": torch, "nn": torch.nn}, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 7 and res.failed == 0, res


FENCES = [f for p in PAGES for f in re.findall(r"(?:^|\n)([^\n]*)\n```([^\n]*)\n(.*?)```", p.read_text(), flags=re.S)]


def test_every_code_block_is_classified():
    """Each block is python (run above), protobuf (parsed below) or sh: marked long, or run here."""
    kinds = [lang for _, lang, _ in FENCES]
    assert kinds and set(kinds) <= {"python", "sh", "protobuf"}, kinds
    for before, lang, body in FENCES:
        if lang == "sh":
            assert before.startswith("<!-- long:") or before == "<!-- tested -->", \
                f"README shell block {body.splitlines()[0]!r} is neither marked long nor tested"


@pytest.mark.parametrize("body", [b for _, lang, b in FENCES if lang == "protobuf"])
def test_readme_prototxt_snippets_parse(body):
    from google.protobuf import text_format

    from exdrop.proto import caffe_pb2
    text = body.replace("layer {", "", 1).rsplit("}", 1)[0]
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    assert lp.type == "Python" and "dropout_ratio" in lp.python_param.param_str


@pytest.mark.parametrize("body", [b for before, lang, b in FENCES if lang == "sh" and before == "<!-- tested -->"])
def test_readme_tested_shell_blocks_run(body, tmp_path):
    import subprocess
    root = README.parent
    for line in body.splitlines():
        cmd = line.split("#")[0].strip()
        if cmd:
            done = subprocess.run(["bash", "-c", cmd], cwd=root, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"README: `{cmd}` failed:\n{done.stderr[-2000:]}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_files(page):
    """README and docs/ link each other and the committed results: every relative link exists."""
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    missing = [t for t in targets if not t.startswith(("http://", "https://", "mailto:"))
               and not (page.parent / t).exists()]
    assert not missing, f"{page.name}: links to missing files {missing}"


def test_readme_is_a_front_door():
    """The README stays short (the rest lives in docs/, one topic a page) and links every page."""
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in text, f"README does not link docs/{page.name}"
