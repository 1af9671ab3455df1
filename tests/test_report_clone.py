"""`make report` and `exdrop report RUN` in a fresh clone: only the committed small files of a sweep
(plan.json, each run's results.json / log.csv / analysis.json; no snapshots) are there."""
import re
import shutil
import subprocess
from pathlib import Path

from exdrop.cli import main as exdrop_main
from make_dry import unquoted  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _default_sweep() -> str:
    make = subprocess.run(["make", "-n", "report", "PY=python"], capture_output=True, text=True, cwd=ROOT, check=True)
    return re.search(r"-m exdrop report (\S+)", unquoted(make.stdout)).group(1)


def _clone_of(sweep: str, tmp_path: Path) -> Path:
    """The tracked files of ``sweep`` as a fresh clone has them, at the same repository-relative place."""
    tracked = subprocess.run(["git", "ls-files", sweep], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    for name in tracked.split():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path / sweep


def test_make_report_default_sweep_is_committed_with_its_plan():
    sweep = _default_sweep()
    tracked = subprocess.run(["git", "ls-files", f"{sweep}/plan.json"], capture_output=True, text=True, cwd=ROOT).stdout
    assert tracked.strip() == f"{sweep}/plan.json", f"make report's default sweep {sweep} has no committed plan.json"


def test_report_of_a_clone_sweep_and_of_one_run(tmp_path, monkeypatch, capsys):
    sweep = _default_sweep()
    folder = _clone_of(sweep, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert not list(folder.rglob("*.caffemodel"))
    assert exdrop_main(["analyze", sweep, "--methods", "none,standard_fc1", "--device", "cpu"]) == 0
    assert exdrop_main(["report", sweep]) == 0
    md = (folder / "report.md").read_text()
    assert "Table 5" in md and "No Dropout" in md
    assert "Fig. 6" in md and "snapshots are not here" in md   # said, not a traceback
    run = next(p.parent.parent for p in folder.rglob("analysis/analysis.json"))
    capsys.readouterr()
    assert exdrop_main(["report", str(run.relative_to(tmp_path))]) == 0
    one = (run / "report.md").read_text()
    assert "Table 5" in one and "Calibration" in one


def test_report_of_a_run_without_analysis_names_the_command(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "solver.prototxt").write_text('net: "x.prototxt"\n')
    assert exdrop_main(["report", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"{run}/analysis/analysis.json: run the analysis first (exdrop analyze {run})" in err
