"""The mutation score of the core, from mutmut's results and the equivalent-mutant list.

``make mutate-score`` (and the end of ``make mutate``) runs this. mutmut keeps each
mutated file's results in ``mutants/<path>.meta`` (JSON: ``exit_code_by_key``); the
mutants judged equivalent (no behaviour a user could see changes) are listed in
docs/mutation-survivors.md, one ``- `name`: why`` line each, and leave the denominator.

A module's score is killed (tests failed, or ran into mutmut's time-out) over its
non-equivalent mutants that were checked; "no tests" counts against the score (no test
exercises that code), "not checked" means the module was not run yet and is reported
apart. Exit status 1 when a listed equivalent is not a surviving mutant any more (the
list must not hide a mutant the tests kill, nor name one that no longer exists).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KILLED_CODES = {1, 3, 24, -24, 36, 152, 255}  # mutmut's "killed" and "timeout"
SURVIVED_CODES = {0}
NO_TESTS_CODES = {5, 33}
EQUIVALENT_LINE = re.compile(r"^- `(?P<name>[\w.ǁ]+__mutmut_\d+)`")


def equivalents(survivors_doc: Path) -> set[str]:
    """Mutant names listed as equivalent in the survivors page."""
    if not survivors_doc.exists():
        return set()
    return {match["name"] for line in survivors_doc.read_text().splitlines()
            if (match := EQUIVALENT_LINE.match(line))}


def module_of(meta: Path, mutants_dir: Path) -> str:
    relative = meta.relative_to(mutants_dir / "src").with_suffix("").with_suffix("")
    return ".".join(relative.parts)


def score(mutants_dir: Path, equivalent: set[str]) -> tuple[list[dict], set[str]]:
    """One row per mutated module; and the listed equivalents that did not survive."""
    rows, stale = [], set(equivalent)
    for meta in sorted((mutants_dir / "src").rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts: Counter[str] = Counter()
        for name, code in codes.items():
            if name in equivalent and code is None:
                stale.discard(name)  # its module was not run: nothing to judge yet
            if name in equivalent and code in SURVIVED_CODES:
                stale.discard(name)
                counts["equivalent"] += 1
                continue
            if code is None:
                counts["not checked"] += 1
            elif code in KILLED_CODES:
                counts["killed"] += 1
            elif code in SURVIVED_CODES:
                counts["survived"] += 1
            elif code in NO_TESTS_CODES:
                counts["no tests"] += 1
            else:
                counts["other"] += 1  # suspicious, segfault, interrupted
        checked = counts["killed"] + counts["survived"] + counts["no tests"] + counts["other"]
        rows.append({"module": module_of(meta, mutants_dir), "mutants": len(codes),
                     "checked": checked, **counts})
    return rows, stale


def percent(killed: int, checked: int) -> str:
    return f"{100 * killed / checked:.1f} %" if checked else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=REPO / "mutants")
    parser.add_argument("--survivors", type=Path, default=REPO / "docs/mutation-survivors.md")
    args = parser.parse_args(argv)
    if not (args.mutants / "src").is_dir():
        print(f"no mutmut results under {args.mutants}: run `make mutate` first",
              file=sys.stderr)
        return 2
    rows, stale = score(args.mutants, equivalents(args.survivors))
    header = ("module", "mutants", "equivalent", "killed", "survived", "no tests", "other",
              "not checked", "score")
    print(" | ".join(header))
    totals: Counter[str] = Counter()
    for row in rows:
        print(" | ".join([row["module"], *(str(row.get(k, 0)) for k in header[1:-1]),
                          percent(row.get("killed", 0), row["checked"])]))
        if row["checked"]:  # a module not run yet stays out of the total
            totals.update({k: v for k, v in row.items() if k != "module"})
    print(f"total over the scored modules: {totals['killed']} killed of "
          f"{totals['checked']} non-equivalent = {percent(totals['killed'], totals['checked'])}"
          f" ({totals['equivalent']} equivalent left out)")
    if stale:
        print("listed as equivalent but not a surviving mutant (killed, renamed or gone):",
              *sorted(stale), sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
