"""Compare the fused stage-1 run with the committed unfused one, job by job.

Reads both ledgers' job records (experiments/stage1 and experiments/fused/stage1),
matches jobs by run name (the same grid cell: the committed stage-1 records keep the
ids they were recorded with, from before identity covered the composed config, so a
fresh ledger gives the same jobs new ids), and writes COMPARISON.md beside the fused
ledger: wall time both ways and, per job, the difference in final test mse and test
loss, largest first.
Usage: python benchmarks/compare_fused_stage1.py [unfused_dir] [fused_dir]
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any


def _records(stage_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted((stage_dir / "jobs").glob("*.json")):
        record = json.loads(path.read_text())
        out[record["run_name"]] = record
    return out


def _wall(records: dict[str, dict[str, Any]]) -> tuple[str, str, float] | None:
    starts = [r["started_at"] for r in records.values() if r.get("started_at")]
    ends = [r["finished_at"] for r in records.values() if r.get("finished_at")]
    if not starts or not ends:
        return None
    first, last = min(starts), max(ends)
    seconds = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
    return first, last, seconds


def _ledger_wall(stage_dir: Path) -> tuple[str, str, float] | None:
    """First ``dispatched`` to last ``outcome`` event: the sweep's wall time as its
    launcher saw it. Records' own times can mislead: a record re-made later (fused
    stage 1's seed 1, NOTES.md) starts when it was re-made (issue 24)."""
    path = stage_dir / "ledger.jsonl"
    if not path.exists():
        return None
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    dispatched = [e["time"] for e in events if e.get("event") == "dispatched" and e.get("time")]
    outcomes = [e["time"] for e in events if e.get("event") == "outcome" and e.get("time")]
    if not dispatched or not outcomes:
        return None
    first, last = min(dispatched), max(outcomes)
    seconds = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
    return first, last, seconds


def main(argv: list[str]) -> int:
    unfused_dir = Path(argv[0]) if argv else Path("experiments/stage1")
    fused_dir = Path(argv[1]) if len(argv) > 1 else Path("experiments/fused/stage1")
    unfused, fused = _records(unfused_dir), _records(fused_dir)
    finished = {name: r for name, r in fused.items() if r.get("status") == "FINISHED"}
    rows = []
    for name, record in finished.items():
        base = unfused.get(name)
        if not base or base.get("status") != "FINISHED":
            continue
        m, b = record["metrics"], base["metrics"]
        rows.append({"job": record["run_name"],
                     "d_mse": m["test/mse"] - b["test/mse"],
                     "d_loss": m["test/loss"] - b["test/loss"],
                     "mse": b["test/mse"], "loss": b["test/loss"]})
    rows.sort(key=lambda r: -max(abs(r["d_mse"]), abs(r["d_loss"])))
    lines = ["# Fused stage 1 against the committed unfused stage 1", ""]
    for name, records, stage_dir in (("unfused", unfused, unfused_dir),
                                     ("fused", fused, fused_dir)):
        wall = _wall({k: v for k, v in records.items() if v.get("status") == "FINISHED"})
        done = sum(1 for r in records.values() if r.get("status") == "FINISHED")
        if wall:
            lines.append(f"- {name}: {done}/{len(records)} jobs finished, first start "
                         f"{wall[0]}, last finish {wall[1]} (job records): "
                         f"{wall[2] / 60:.1f} min")
        ledger_wall = _ledger_wall(stage_dir)
        if ledger_wall:
            lines.append(f"  - ledger: first dispatch {ledger_wall[0]}, last outcome "
                         f"{ledger_wall[1]}: {ledger_wall[2] / 60:.1f} min wall")
    lines += ["", f"Jobs compared: {len(rows)}.", ""]
    if rows:
        worst_mse = max(abs(r["d_mse"]) for r in rows)
        worst_loss = max(abs(r["d_loss"]) for r in rows)
        same = sum(1 for r in rows if r["d_mse"] == 0 and abs(r["d_loss"]) < 1e-6)
        lines += [f"Largest |difference|: test mse {worst_mse:.2e}, test loss {worst_loss:.2e}; "
                  f"{same} jobs with identical test mse and test loss within 1e-6.", "",
                  "| job | test mse (unfused) | Δ mse (fused − unfused) | test loss (unfused) "
                  "| Δ loss |", "|---|---|---|---|---|"]
        lines += [f"| {r['job']} | {r['mse']:.4f} | {r['d_mse']:+.2e} | {r['loss']:.4f} "
                  f"| {r['d_loss']:+.2e} |" for r in rows]
    text = "\n".join(lines) + "\n"
    (fused_dir / "COMPARISON.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
