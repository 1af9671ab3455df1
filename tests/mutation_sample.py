"""Estimate `make mutation`'s score from a seeded random sample of its mutants.

The full extended selection (pyproject's ``[tool.mutmut] only_mutate``) has about 9,000 mutants;
at several seconds each on two cores that is a night's work. A uniform random sample of n of them,
drawn with a fixed seed from the sorted list of every mutant mutmut generates, gives the score
with a binomial (Wilson) 95% interval, per file and overall, and names each survivor so a test can
kill it. Run from the repository root (``make mutation-sample SAMPLE=300 SEED=1``):

    python tests/mutation_sample.py --n 300 --seed 1 --out docs/mutation-sample.json

Steps: generate the mutants (mutmut's own generator, incremental), list their names from
``mutants/**/*.meta``, draw the sample, ``mutmut run`` those names, read their exit codes back.
A mutant whose function no test reaches ("no tests") counts as not killed in ``score``;
``score_tested`` leaves those out as ``make mutation`` does.

A survivor judged equivalent (no behaviour a user can observe changes) is left out of the
denominator, as mutation testing defines its score, once a verdicts file says so: a markdown table
whose rows read ``| `name` | status | equivalent: why |`` (``docs/mutation-survivors*.md``).
``--rescore SAMPLE.json --verdicts FILE`` scores a finished sample again with them.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

KILLED = ("killed", "timeout", "segfault")


def _metas(root: Path):
    """(source file, {mutant name: exit code or None}) for each of mutmut's .meta files."""
    for meta in sorted(root.rglob("*.py.meta")):
        yield str(meta.relative_to(root))[: -len(".meta")], json.loads(meta.read_text())["exit_code_by_key"]


def mutant_names(root: Path = Path("mutants")) -> dict[str, str]:
    """Every generated mutant's name -> the source file it mutates."""
    return {name: source for source, codes in _metas(root) for name in codes}


def source_file(name: str) -> str:
    """The file a mutant name mutates: ``pkg.mod.x_f__mutmut_3`` -> ``pkg/mod.py``."""
    return name.rsplit(".", 1)[0].replace(".", "/") + ".py"


def draw(names, n: int, seed: int, only: str | None = None) -> list[str]:
    """n names drawn uniformly without replacement, the same for the same list, n, seed and filter."""
    pool = sorted(x for x in names if only is None or fnmatch.fnmatch(x, only))
    if n > len(pool):
        raise SystemExit(f"mutation_sample: --n {n} is more than the {len(pool)} mutants"
                         + (f" matching {only!r}" if only else ""))
    return sorted(random.Random(seed).sample(pool, n))


def wilson(k: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest
    if n == 0:
        return (0.0, 1.0)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))


VERDICT_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|[^|]*\|\s*equivalent\b", re.M)


def equivalent_in(verdicts: list[Path]) -> set[str]:
    """The mutant names that the verdict tables mark equivalent."""
    return {m.group(1) for path in verdicts for m in VERDICT_ROW.finditer(Path(path).read_text())}


def score(statuses: dict[str, str], source_of: dict[str, str], equivalent: set[str] = frozenset()) -> dict:
    """The sample's statuses (mutmut's words) -> overall and per-file counts, scores, intervals.
    A mutant in ``equivalent`` that was not killed counts as "equivalent", outside the denominator."""
    statuses = {k: ("equivalent" if k in equivalent and v not in KILLED else v) for k, v in statuses.items()}

    def block(keys):
        c = Counter(statuses[k] for k in keys)
        killed = sum(c[s] for s in KILLED)
        counted = len(keys) - c["skipped"] - c["caught by type check"] - c["equivalent"]
        tested = counted - c["no tests"]
        lo, hi = wilson(killed, counted)
        return {"sampled": len(keys), "counted": counted, "killed": killed, "counts": dict(sorted(c.items())),
                "score": killed / counted if counted else None, "interval95": [lo, hi],
                "score_tested": killed / tested if tested else None}
    by_file = {}
    for key, source in source_of.items():
        by_file.setdefault(source, []).append(key)
    return {"overall": block(list(statuses)),
            "by_file": {f: block(sorted(k)) for f, k in sorted(by_file.items())},
            "not_killed": {k: statuses[k] for k in sorted(statuses) if statuses[k] not in KILLED},
            "statuses": dict(sorted(statuses.items()))}


def generate() -> None:
    """mutmut 3.8.1's generation step alone (what ``mutmut run`` does before its stats)."""
    from mutmut.__main__ import create_mutants, set_mutant_under_test
    from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, setup_source_paths
    set_mutant_under_test("mutant_generation")
    os.makedirs("mutants", exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    setup_source_paths()
    create_mutants(os.cpu_count() or 2)


def statuses_of(names, root: Path = Path("mutants")) -> dict[str, str]:
    from mutmut.stats import status_by_exit_code
    codes = {name: code for _, by_name in _metas(root) for name, code in by_name.items()}
    return {n: status_by_exit_code[codes.get(n)] for n in names}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="how many mutants to test (default 300)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", help="an fnmatch pattern over mutant names, e.g. 'exdrop.run.runlog.*'")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", type=Path, help="write the result here as JSON")
    ap.add_argument("--verdicts", type=Path, action="append", default=[],
                    help="a markdown table of verdicts; its rows marked `equivalent` leave the denominator")
    ap.add_argument("--rescore", type=Path, metavar="SAMPLE_JSON",
                    help="score a finished sample's statuses again with --verdicts (runs no mutant)")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"--n must be at least 1, not {args.n}")
    equivalent = equivalent_in(args.verdicts)
    if args.rescore:
        before = json.loads(args.rescore.read_text())
        header = {k: before[k] for k in ("seed", "n", "only", "population")}
        statuses = before["statuses"]
        source_of = {k: source_file(k) for k in statuses}
    else:
        generate()
        names = mutant_names()
        sample = draw(names, args.n, args.seed, args.only)
        print(f"mutation_sample: {len(sample)} of {len(names)} mutants, seed {args.seed}", flush=True)
        rc = subprocess.call([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children),
                              *sample])
        if rc != 0:
            print(f"mutation_sample: mutmut run exited {rc}", file=sys.stderr)
            return rc
        header = {"seed": args.seed, "n": args.n, "only": args.only, "population": len(names)}
        statuses, source_of = statuses_of(sample), {k: names[k] for k in sample}
    result = {**header, **score(statuses, source_of, equivalent), "verdicts": [str(v) for v in args.verdicts]}
    o = result["overall"]
    left_out = f" ({o['sampled'] - o['counted']} of the {o['sampled']} left out)" if o["counted"] != o["sampled"] else ""
    print(f"mutation score (sample): {o['killed']}/{o['counted']} = {100 * (o['score'] or 0):.1f}% "
          f"[95% {100 * o['interval95'][0]:.1f}, {100 * o['interval95'][1]:.1f}]{left_out}; not killed:")
    for k, s in result["not_killed"].items():
        print(f"  {s:10s} {k}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
