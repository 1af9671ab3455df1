"""tests/mutation_sample.py (the tool behind `make mutation-sample`): the sample is uniform, reproducible and filtered as asked, and the
score counts what mutmut's exit codes mean (a timeout kills; "no tests" does not)."""
import json
from pathlib import Path

import mutation_sample as ms
import pytest


def _metas(root: Path) -> dict:
    codes = {"a.py": {f"pkg.a.x_f__mutmut_{i}": None for i in range(1, 41)},
             "sub/b.py": {f"pkg.sub.b.x_g__mutmut_{i}": None for i in range(1, 21)}}
    for src, keys in codes.items():
        meta = root / (src + ".meta")
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"exit_code_by_key": keys, "durations_by_key": {}}))
    return codes


def test_names_come_from_every_meta_file_with_their_source(tmp_path):
    _metas(tmp_path)
    names = ms.mutant_names(tmp_path)
    assert len(names) == 60
    assert names["pkg.a.x_f__mutmut_7"] == "a.py" and names["pkg.sub.b.x_g__mutmut_20"] == "sub/b.py"


def test_the_draw_is_reproducible_uniform_and_filtered(tmp_path):
    _metas(tmp_path)
    names = ms.mutant_names(tmp_path)
    one = ms.draw(names, 10, seed=3)
    assert one == ms.draw(dict(reversed(list(names.items()))), 10, seed=3)   # order of listing is irrelevant
    assert len(set(one)) == 10 and set(one) <= set(names)
    assert one != ms.draw(names, 10, seed=4)
    only_b = ms.draw(names, 20, seed=1, only="pkg.sub.b.*")
    assert set(only_b) == {k for k in names if k.startswith("pkg.sub.b.")}
    # every mutant is as likely: over many seeds each of 60 is drawn about 10/60 of the time
    counts = {k: 0 for k in names}
    for seed in range(600):
        for k in ms.draw(names, 10, seed):
            counts[k] += 1
    assert min(counts.values()) > 60 and max(counts.values()) < 145
    with pytest.raises(SystemExit, match="more than the 20 mutants matching"):
        ms.draw(names, 21, 1, only="pkg.sub.b.*")


def test_score_counts_timeouts_as_killed_and_no_tests_as_not(tmp_path):
    statuses = {"m1": "killed", "m2": "timeout", "m3": "survived", "m4": "no tests", "m5": "skipped",
                "m6": "segfault", "m7": "suspicious"}
    source = {k: ("a.py" if k in ("m1", "m2", "m3") else "b.py") for k in statuses}
    s = ms.score(statuses, source)
    o = s["overall"]
    assert o["killed"] == 3 and o["sampled"] == 7
    assert o["score"] == pytest.approx(3 / 6)            # skipped left out, no tests counted
    assert o["score_tested"] == pytest.approx(3 / 5)     # as make mutation: no tests left out too
    lo, hi = o["interval95"]
    assert 0.1 < lo < 0.5 < hi < 0.9
    assert s["by_file"]["a.py"]["killed"] == 2 and s["by_file"]["a.py"]["score"] == pytest.approx(2 / 3)
    assert s["not_killed"] == {"m3": "survived", "m4": "no tests", "m5": "skipped", "m7": "suspicious"}
    assert s["statuses"] == dict(sorted(statuses.items()))   # every sampled mutant, so a later verdict can rescore


def test_wilson_interval_matches_the_formula():
    import math
    k, n, z = 270, 300, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = ms.wilson(k, n)
    assert lo == pytest.approx(centre - half, abs=1e-9) and hi == pytest.approx(centre + half, abs=1e-9)


def test_equivalent_verdicts_leave_the_denominator_and_a_sample_rescores(tmp_path):
    verdicts = tmp_path / "verdicts.md"
    verdicts.write_text("| mutant | status | fate |\n|---|---|---|\n"
                        "| `pkg.a.x_f__mutmut_3` | survived | equivalent: a thread's name |\n"
                        "| `pkg.a.x_f__mutmut_4` | survived | killed by test_x |\n"
                        "| `pkg.a.x_f__mutmut_1` | killed | equivalent: a killed mutant stays killed |\n")
    assert ms.equivalent_in([verdicts]) == {"pkg.a.x_f__mutmut_3", "pkg.a.x_f__mutmut_1"}
    statuses = {"pkg.a.x_f__mutmut_1": "killed", "pkg.a.x_f__mutmut_2": "killed", "pkg.a.x_f__mutmut_3": "survived",
                "pkg.a.x_f__mutmut_4": "survived", "pkg.sub.b.xǁCǁg__mutmut_1": "killed"}
    assert ms.source_file("pkg.sub.b.xǁCǁg__mutmut_1") == "pkg/sub/b.py"
    source = {k: ms.source_file(k) for k in statuses}
    plain = ms.score(statuses, source)["overall"]
    assert plain["score"] == pytest.approx(3 / 5)
    judged = ms.score(statuses, source, ms.equivalent_in([verdicts]))
    assert judged["overall"]["score"] == pytest.approx(3 / 4) and judged["overall"]["counts"]["equivalent"] == 1
    assert judged["by_file"]["pkg/a.py"]["score"] == pytest.approx(2 / 3)
    sample = tmp_path / "sample.json"
    sample.write_text(json.dumps({"seed": 2, "n": 5, "only": None, "population": 99, **ms.score(statuses, source)}))
    out = tmp_path / "rescored.json"
    assert ms.main(["--rescore", str(sample), "--verdicts", str(verdicts), "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["overall"]["score"] == pytest.approx(3 / 4) and again["seed"] == 2 and again["population"] == 99
    assert again["verdicts"] == [str(verdicts)] and again["overall"]["counted"] == 4
