"""``tmgg-sweep fsck stage=X`` / ``--all``: check a stage's files for consistency.

Reads files only (no Hydra composition), so it runs in CI over every committed stage.
``--acknowledge ID --reason TEXT`` appends an ``acknowledged`` event (tmgg's own write;
committed ledgers are never edited by hand). Exit 0 when every finding is
acknowledged (notes aside), 1 when one is not, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tmgg.jobs.fsck import StageCheck, acknowledge, check_stage, stage_ledgers
from tmgg.jobs.ledger import Ledger


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmgg-sweep fsck",
        description="Check stages' ledgers, job records, claims and plans for consistency "
                    "and explain each finding.")
    parser.add_argument("overrides", nargs="*",
                        help="stage=NAME, experiments_dir=DIR (default experiments), "
                             "outputs_dir=DIR (checks output folders when given)")
    parser.add_argument("--all", action="store_true",
                        help="every stage under experiments_dir (nested ones included)")
    parser.add_argument("--acknowledge", action="append", default=[], metavar="FINDING-ID",
                        help="acknowledge a finding (fnmatch pattern, e.g. 'dirty-tree:*'); "
                             "appends an `acknowledged` event per finding")
    parser.add_argument("--reason", default="", help="why the finding is acceptable")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="also list acknowledged findings and notes")
    return parser


def _settings(overrides: list[str]) -> dict[str, str]:
    settings: dict[str, str] = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key not in ("stage", "experiments_dir", "outputs_dir"):
            raise ValueError(f"{override!r}: fsck takes stage=, experiments_dir= and "
                             "outputs_dir= only")
        settings[key] = value
    return settings


def _print(check: StageCheck, verbose: bool) -> None:
    unexplained = check.unexplained
    acknowledged = [f for f in check.findings if f.acknowledged is not None]
    notes = [f for f in check.findings if f.is_note]
    verdict = "ok" if not unexplained else f"{len(unexplained)} unexplained finding(s)"
    print(f"{check.name}: {verdict}; {len(acknowledged)} acknowledged, {len(notes)} note(s)")
    for finding in unexplained:
        print(f"  {finding.explain()}")
    if verbose:
        for finding in [*acknowledged, *notes]:
            print(f"  {finding.explain()}")
    for stale in check.stale_acknowledgements:
        print(f"  note: acknowledgement of {stale} matches no current finding")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = _settings(args.overrides)
    except ValueError as error:
        print(f"tmgg-sweep fsck: {error}", file=sys.stderr)
        return 2
    experiments_dir = Path(settings.get("experiments_dir", "experiments"))
    outputs_dir = Path(settings["outputs_dir"]) if "outputs_dir" in settings else None
    if args.all == ("stage" in settings):
        print("tmgg-sweep fsck: name one stage (stage=NAME) or --all", file=sys.stderr)
        return 2
    if args.all:
        if args.acknowledge:
            print("tmgg-sweep fsck: --acknowledge acts on one stage=", file=sys.stderr)
            return 2
        ledgers = stage_ledgers(experiments_dir)
        if not ledgers:
            print(f"tmgg-sweep fsck: no ledger.jsonl under {experiments_dir}", file=sys.stderr)
            return 2
    else:
        ledger = Ledger(experiments_dir, settings["stage"])
        if not ledger.events_path.exists():
            print(f"tmgg-sweep fsck: {ledger.events_path} does not exist", file=sys.stderr)
            return 2
        ledgers = [ledger]
    if args.acknowledge:
        try:
            done = acknowledge(ledgers[0], args.acknowledge, args.reason, outputs_dir)
        except ValueError as error:
            print(f"tmgg-sweep fsck: {error}", file=sys.stderr)
            return 2
        print(f"acknowledged {len(done)} finding(s) in {ledgers[0].events_path}")
    checks = [check_stage(ledger, outputs_dir) for ledger in ledgers]
    for check in checks:
        _print(check, args.verbose)
    return 1 if any(check.unexplained for check in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
