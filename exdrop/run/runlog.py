"""The run folder's records, shared by the engine and the Caffe backend.

``log.csv`` gets one row per display point (phase ``train``) and per test
pass (``test``); ``results.json`` the final metrics. Both are written so that
a crash leaves the previous complete version (flush per row; atomic replace).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

BASE_COLUMNS = ["iter", "phase", "lr", "elapsed_s"]


class RunLog:
    """``resume_iter``: a resumed run's iteration; the rows before it are kept. A snapshot at
    iteration N is written after the display row of N - 1 and before the test at N, so the test
    rows at N are kept too when ``retest_at_resume`` is False (the resumed run will not test at N
    again: N was the end of the first run, its final test). ``display``: the run's display interval; a
    resumed log drops the train rows off that schedule (a run's closing row at its last iteration,
    which the continued run does not have)."""

    def __init__(self, out: Path, outputs, resume_iter: int | None = None, retest_at_resume: bool = True,
                 display: int | None = None, write: bool = True):
        self.out = Path(out)
        self.columns = BASE_COLUMNS + sorted(set(outputs))
        self.rows: list[dict] = []
        self.file = self.writer = None
        if not write:   # a many-process run's other ranks: the rows are kept in memory only
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "log.csv"
        kept = []
        if resume_iter is not None and path.exists():
            try:
                with open(path, newline="") as f:  # keep what happened before the snapshot
                    kept = [r for r in csv.DictReader(f) if int(r["iter"]) < resume_iter or (
                        int(r["iter"]) == resume_iter and r["phase"].startswith("test") and not retest_at_resume)]
            except (UnicodeDecodeError, KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}: the run's log cannot be read to resume it ({type(exc).__name__}: {exc}); "
                                 "move it aside to start the log afresh") from None
            if display is not None:
                kept = [r for r in kept if r["phase"] != "train" or (display and int(r["iter"]) % display == 0)]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
        self.writer.writeheader()
        for r in kept:
            self.add(r)

    def add(self, row: dict) -> None:
        if self.writer is not None:
            self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            self.file.flush()
        self.rows.append(row)

    def summary(self) -> dict:
        """Last and best test metrics and the last smoothed training loss."""
        tests = [r for r in self.rows if str(r["phase"]).startswith("test")]
        trains = [r for r in self.rows if r["phase"] == "train"]
        last = tests[-1] if tests else {}
        accs = [_num(r.get("accuracy")) for r in tests if _num(r.get("accuracy")) is not None]
        return {"test_accuracy": _num(last.get("accuracy")), "test_loss": _num(last.get("loss")),
                "best_test_accuracy": max(accs) if accs else None,
                "train_loss": _num(trains[-1].get("loss")) if trains else None}

    def finish(self, results: dict) -> dict:
        if self.file is None:
            return results
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, self.out / "results.json")
        self.file.close()
        return results


def budget(max_iter: int, solver_max_iter: int) -> str:
    return "full" if max_iter >= solver_max_iter else f"reduced: {max_iter} of the solver's {solver_max_iter} iterations"


def format_row(row: dict) -> str:
    shown = " ".join(f"{k}={v:.4f}" for k, v in row.items()
                     if k not in BASE_COLUMNS and isinstance(v, float))
    return f"[{row['phase']} @ {row['iter']}] {shown}"


def _num(v):
    return None if v in (None, "") else float(v)


def plan_run_folder(sweep, entry: dict) -> Path:
    """A sweep's plan.json run entry's folder: inside the sweep folder wherever that now is (a
    sweep committed on one machine and read on another), else the absolute path the plan recorded."""
    inside = Path(sweep) / entry["in_sweep"] if entry.get("in_sweep") else None
    return inside if inside is not None and inside.is_dir() else Path(entry.get("folder", ""))


def read_results(run_folder) -> dict:
    """A run folder's ``results.json`` as a dict; ``{}`` where it is missing, unreadable or not an
    object (a run that has not finished, or a damaged file: its numbers are then left out)."""
    try:
        res = json.loads((Path(run_folder) / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return res if isinstance(res, dict) else {}
