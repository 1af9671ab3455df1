"""Every knob that `make help` lists for a target reaches that target's command: `make -n TARGET
KNOB=value` prints another command than `make -n TARGET` (a knob that changes nothing would, for
example, let `make table2 MAX_ITER=2` launch the full budget)."""
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from make_dry import unquoted

ROOT = Path(__file__).resolve().parents[1]
BASE = ["PY=python", "DATA=given.tgz"]   # no venv needed: make -n only prints
# knobs whose effect is not on the printed command line (they choose what make itself does)
NOT_ON_THE_COMMAND = {("setup", "CI")}


def _help_blocks() -> dict[str, str]:
    text = subprocess.run(["make", "help", *BASE], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    blocks, current = {}, None
    for line in text.splitlines():
        m = re.match(r"make (\S+)\s", line + " ")
        if m:
            current = m.group(1)
            blocks[current] = line[len(m.group(0)):]
        elif current and line.startswith(" "):
            blocks[current] += " " + line.strip()
    return blocks


def _knobs(block: str) -> dict[str, list[str]]:
    """KNOB -> values to try: the listed alternatives (a|b|c), or a sentinel for a free value."""
    out = {}
    for name, value in re.findall(r"\b([A-Z][A-Z0-9_]*[A-Z0-9])=(<[^>]*>|[A-Za-z0-9_.,|/'-]*)", block):
        if value and "|" in value and not value.startswith("<"):
            out[name] = [v for v in value.split("|") if v]
        elif value.strip("',") and not value.startswith("<"):   # SKIP_CAFFE=1, NETS=cnn2,vgg16: that or another
            out[name] = [value.strip("',"), "knob_sentinel"]
        else:
            out[name] = ["7"] if re.search(r"<n\b|<k\b|<b>|<n:|<k ", value) else ["knob_sentinel"]
    return out


# what a target needs for its knobs to be read at all (answer: PHASE=A uses no recipe knob)
CONTEXT = {"answer": ["PHASE=B"]}


def _dry(target, *knobs) -> str:
    proc = subprocess.run(["make", "-n", target, *BASE, *CONTEXT.get(target, []), *knobs], capture_output=True, text=True, cwd=ROOT)
    return proc.stdout + proc.stderr


CASES = [(t, k, vals) for t, block in _help_blocks().items() for k, vals in _knobs(block).items()
         if (t, k) not in NOT_ON_THE_COMMAND and t not in ("help", "test", "caffe", "prototxt")]


@pytest.mark.parametrize("target, knob, values", CASES, ids=[f"{t}-{k}" for t, k, _ in CASES])
def test_every_listed_knob_reaches_the_command(target, knob, values):
    plain = _dry(target)
    changed = [v for v in values if _dry(target, f"{knob}={v}") != plain]
    assert changed, f"make {target}: {knob}={'|'.join(values)} changes nothing in `make -n {target}`"


def test_the_table2_budget_knob_reaches_the_sweep():
    assert "--max-iter 2" in unquoted(_dry("table2", "MAX_ITER=2"))


def test_values_reach_the_command_as_one_word_and_run_nothing(tmp_path):
    """A path with spaces and non-ASCII letters stays one argument; a value holding `;` runs nothing."""
    odd = "/x/ü n i/it's.tgz"
    line = next(x for x in _dry("train-cifar10", f"DATA={odd}").splitlines() if " exdrop train " in x)
    words = shlex.split(line)
    assert words[words.index("--data") + 1] == odd
    marker = tmp_path / "ran"
    subprocess.run(["make", "table2", "PY=true", f"METHODS=a;touch {marker}", f"SWEEP_OUT={tmp_path}/s"],
                   capture_output=True, text=True, cwd=ROOT)
    assert not marker.exists(), "a make knob's value ran as a shell command"
