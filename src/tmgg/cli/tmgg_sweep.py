"""``tmgg-sweep``: plan, status, resume, reconcile, sync, report, compare and cancel.

Every command takes the overrides ``tmgg-train -m`` takes (``stage=stage1 ...``).
Each command lives in its own module exposing ``main(argv) -> int``; this file
only dispatches, so ``tmgg-sweep --help`` stays instant.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "plan": ("tmgg.cli.commands", "plan_main",
             "dry run: every job, its run name, W&B destination and cost; dispatches nothing"),
    "status": ("tmgg.cli.commands", "status_main",
               "the stage's ledger as a table with counts (polls detached Modal calls)"),
    "resume": ("tmgg.cli.commands", "resume_main",
               "launch only the stage's missing and failed jobs"),
    "reconcile": ("tmgg.cli.reconcile", "main",
                  "expected jobs versus W&B and outputs: missing, failed, misrouted, duplicated"),
    "sync": ("tmgg.cli.sync", "main",
             "upload the stage's offline W&B runs to its pinned entity, project and host"),
    "relog": ("tmgg.cli.sync", "relog_main",
              "re-log FINISHED jobs whose W&B run is missing into a new run generation"),
    "report": ("tmgg.cli.reporting.report", "main",
               "write experiments/<stage>/REPORT.md and plots"),
    "compare": ("tmgg.cli.reporting.compare", "main",
                "write experiments/COMPARISON.md: stage 1, its legacy variant and the "
                "earlier system side by side (issue 14)"),
    "fsck": ("tmgg.cli.fsck", "main",
             "check stages' ledgers, records, claims and plans for consistency (issue 24)"),
    "verify": ("tmgg.cli.verify", "main",
               "re-run recorded jobs into a scratch dir and compare their test metrics "
               "(issue 24)"),
    "cancel": ("tmgg.launch.modal.calls", "cancel_main",
               "cancel a detached Modal sweep's running calls"),
}


def usage() -> str:
    lines = ["usage: tmgg-sweep COMMAND [options] [overrides...]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    lines += ["", "Overrides are those of `tmgg-train -m`, e.g. stage=stage1 model=linear_pe.",
              "`tmgg-sweep COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tmgg-sweep: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from tmgg.cli.guards import launcher_override_refusal, missing_stage_refusal

    refusal = missing_stage_refusal(name, rest) or launcher_override_refusal(rest)
    if refusal is not None:
        print(f"tmgg-sweep {name}: {refusal}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[name]
    function = getattr(importlib.import_module(module_name), function_name)
    from tmgg.jobs.plan import PlanError

    try:
        return int(function(rest) or 0)
    except PlanError as error:
        print(f"tmgg-sweep {name} refused: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tmgg-sweep {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
