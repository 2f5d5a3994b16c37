"""``make mutate-score`` (tools/mutation_score.py): the score is computed from mutmut's
results and the equivalent-survivor list, never by hand, and the list cannot hide a
mutant the tests kill."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SCRIPT = REPO / "tools/mutation_score.py"


def results(root: Path, module: str, codes: dict[str, int | None]) -> None:
    meta = root / "mutants/src" / (module.replace(".", "/") + ".py.meta")
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"exit_code_by_key": codes}))


def score(root: Path, survivors: str) -> subprocess.CompletedProcess[str]:
    doc = root / "survivors.md"
    doc.write_text(survivors)
    return subprocess.run([sys.executable, str(SCRIPT), "--mutants", str(root / "mutants"),
                           "--survivors", str(doc)], capture_output=True, text=True,
                          timeout=60)


def test_the_score_leaves_out_listed_equivalents_and_counts_no_tests_against(
        tmp_path: Path) -> None:
    results(tmp_path, "tmgg.a", {"tmgg.a.x_f__mutmut_1": 1, "tmgg.a.x_f__mutmut_2": 0,
                                 "tmgg.a.x_f__mutmut_3": 0, "tmgg.a.x_f__mutmut_4": 36,
                                 "tmgg.a.x_f__mutmut_5": 33})
    results(tmp_path, "tmgg.b", {"tmgg.b.x_g__mutmut_1": None})
    run = score(tmp_path, "# list\n\n- `tmgg.a.x_f__mutmut_3`: a log line.\n"
                          "- not killed: `tmgg.a.x_f__mutmut_2`: needs a GPU.\n")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "tmgg.a | 5 | 1 | 2 | 1 | 1 | 0 | 0 | 50.0 %" in lines
    assert "tmgg.b | 1 | 0 | 0 | 0 | 0 | 0 | 1 | n/a" in lines
    assert lines[-1] == ("total over the scored modules: 2 killed of 4 non-equivalent = "
                         "50.0 % (1 equivalent left out)")


def test_an_equivalent_that_the_tests_now_kill_fails_the_score(tmp_path: Path) -> None:
    results(tmp_path, "tmgg.a", {"tmgg.a.x_f__mutmut_1": 1, "tmgg.a.x_f__mutmut_2": 0})
    run = score(tmp_path, "- `tmgg.a.x_f__mutmut_1`: judged equivalent once.\n"
                          "- `tmgg.a.x_gone__mutmut_9`: renamed since.\n")
    assert run.returncode == 1
    assert "tmgg.a.x_f__mutmut_1" in run.stderr and "tmgg.a.x_gone__mutmut_9" in run.stderr
    assert run.stdout.splitlines()[-1].startswith("total over the scored modules: 1 killed of 2")


def test_without_results_it_says_to_run_make_mutate(tmp_path: Path) -> None:
    run = score(tmp_path, "")
    assert run.returncode == 2 and "run `make mutate` first" in run.stderr
