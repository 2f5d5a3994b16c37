"""``tmgg-sweep compare``: stage 1 against the earlier system's results (issue 14).

One markdown file, ``experiments/COMPARISON.md`` by default, made from the records of
finished stages (their ledgers, read as ``tmgg-sweep report --ledger`` reads them)
and from the earlier system's table, committed as data with its provenance
(``experiments/earlier_system/stage1.json``):

- per stage-1 configuration (model, k, lr, wd): the earlier system's mean test mse,
  the legacy stage (``stage1_legacy``, the earlier system's variant of the task) and
  today's stage 1, each as mean ± 95 % t interval over seeds beside its own "no
  edges" score; differences between systems are Welch's t tests (issue 24), each
  stage's distance to its own "no edges" a paired interval over seeds;
- the best configuration of each model in each, and the order of the models;
- every ablation stage of the legacy variant that has records
  (``stage1_legacy_ablate_*``): test mse per model and value of the swept option;
- stage 1b (lr 1e-2 .. 2e-1): whether any model beats "return the noisy input".

A stage without records is said to be not run yet. Like REPORT.md the file is a
pure function of the records: fixed order, fixed formats, no timestamp.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmgg.cli.reporting.fields import (
    BASE_KEYS,
    LABELS,
    MSE,
    NO_EDGES,
    NOISY_INPUT,
    NONE_TEXT,
    format_value,
    sort_key,
)
from tmgg.cli.reporting.precision import (
    Interval,
    WelchResult,
    decimals_for,
    interval,
    paired_difference,
    paired_t,
    welch,
    welch_samples,
)
from tmgg.cli.reporting.report import Row, StageReport, beats_text, build_report
from tmgg.config.identity import short_float
from tmgg.jobs.ledger import Ledger

COMPARISON_FILE = "COMPARISON.md"
SIGNIFICANCE = 0.05  # † marks a difference whose two-sided p is below this
EARLIER_FILE = Path("earlier_system") / "stage1.json"
ABLATION_PREFIX = "stage1_legacy_ablate_"
MODEL_ORDER = ("linear_pe", "filter_bank", "self_attention")
#: The earlier system's variant: each option's legacy value (conf/stage/stage1_legacy.yaml).
LEGACY_VALUES: dict[str, Any] = {
    "data.self_loops": True,
    "data.test_split": "outside_train",
    "model.symmetrize": False,
    "objective.loss_diagonal": True,
    "objective.metrics_diagonal": True,
    "trainer.test_checkpoint": "last",
    "trainer.precision": "32-true",  # the trainer default: the earlier system's fp32
}

# (model, k, lr, wd) in one spelling: floats in short exponent form.
CellKey = tuple[str, int, str, str]


def cell_key(model: Any, k: Any, lr: Any, wd: Any) -> CellKey:
    return str(model), int(k), short_float(lr), short_float(wd)


@dataclass(frozen=True)
class Cell:
    """One configuration of one stage: test mse over seeds and its references."""

    values: tuple[float, ...]
    no_edges: float | None
    noisy_input: float | None
    # Per seed, in the order of ``values`` (for paired differences); empty where a job
    # lacks the reference.
    no_edges_values: tuple[float, ...] = ()
    noisy_input_values: tuple[float, ...] = ()
    seeds: tuple[Any, ...] = ()  # of ``values``, in their order

    def paired_with(self, reference: Cell) -> WelchResult | None:
        """This cell minus ``reference`` seed by seed (the seeds both have), tested with
        the paired t test: both sides of an ablation or a precision change share each
        seed's data, test set and initial weights."""
        theirs = dict(zip(reference.seeds, reference.values, strict=True))
        pairs = [(value, theirs[seed]) for seed, value in zip(self.seeds, self.values,
                                                              strict=True) if seed in theirs]
        return paired_t([a for a, _ in pairs], [b for _, b in pairs])

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self) -> str:
        found = interval(self.values)
        return NONE_TEXT if found is None else found.text()

    def below(self, reference: tuple[float, ...]) -> Interval | None:
        """``reference - value`` per seed with its interval (None without references)."""
        if len(reference) != len(self.values) or not reference:
            return None
        return paired_difference(reference, self.values)


def _cell(row: Row) -> Cell:
    pairs = [(job.metrics.get(MSE), job.metrics.get(f"{NO_EDGES}/mse"),
              job.metrics.get(f"{NOISY_INPUT}/mse")) for job in row.finished]
    complete = [p for p in pairs if all(isinstance(v, int | float) for v in p)]
    if len(complete) != len(row.values(MSE)):
        complete = []
    seeds = tuple(job.seed for job in row.finished
                  if isinstance(job.metrics.get(MSE), int | float))
    return Cell(tuple(row.values(MSE)), row.mean(f"{NO_EDGES}/mse"),
                row.mean(f"{NOISY_INPUT}/mse"),
                tuple(float(p[1]) for p in complete), tuple(float(p[2]) for p in complete),
                seeds if len(seeds) == len(row.values(MSE)) else ())


def difference_text(result: WelchResult | None, difference: float | None) -> str:
    """A difference of means with its test (Welch's or paired); † where p < 0.05."""
    if difference is None:
        return NONE_TEXT
    if result is None:
        return f"{difference:+.4f} (no test: one seed or no spread)"
    places = decimals_for(result.half_width)
    return (f"{difference:+.{places}f} ± {result.half_width:.{places}f} ({result.text()})"
            + (" †" if result.p < SIGNIFICANCE else ""))


def paired_text(cell: Cell, reference: Cell) -> str:
    """``cell`` minus ``reference`` with the paired test where the two ran the same
    seeds (Welch's where they did not); a difference equal on every seed has no test."""
    assert cell.mean is not None and reference.mean is not None
    difference = cell.mean - reference.mean
    paired = cell.paired_with(reference)
    if paired is None and len(set(cell.seeds) & set(reference.seeds)) > 1:
        return f"{difference:+.4f} (the same on every seed: no test)"
    return difference_text(paired or welch_samples(cell.values, reference.values),
                           difference)


def against_earlier(cell: Cell, earlier_mean: float, earlier_sd: float | None,
                    earlier_n: int) -> str:
    """A stage's cell minus the earlier system's, with Welch's t where the earlier
    system's spread is known (as the upper end of its model's stated std range)."""
    if cell.mean is None:
        return NONE_TEXT
    result = None
    if earlier_sd is not None and len(cell.values) > 1:
        result = welch(cell.mean, cell.std or 0.0, len(cell.values), earlier_mean,
                       earlier_sd, earlier_n)
    return difference_text(result, cell.mean - earlier_mean)


@dataclass
class StageCells:
    """A finished (or partly finished) stage's cells, or None when it has no records."""

    name: str
    report: StageReport | None

    @property
    def ran(self) -> bool:
        return self.report is not None and any(row.finished for row in self.report.rows)

    def cells(self) -> dict[tuple[Any, ...], Cell]:
        """Cells by (model, k, lr, wd, *other swept values) with at least one result."""
        if self.report is None:
            return {}
        out = {}
        for row in self.report.rows:
            if not row.finished:
                continue
            base = cell_key(row.value(BASE_KEYS[0]), row.value(BASE_KEYS[3]),
                            row.value(BASE_KEYS[1]), row.value(BASE_KEYS[2]))
            extras = tuple(row.value(key) for key in self.report.extra_keys)
            out[(*base, *extras)] = _cell(row)
        return out


def load_stage(experiments: Path, stage: str) -> StageCells:
    """The stage's records as ``tmgg-sweep report --ledger`` reads them (None if none)."""
    root = experiments / stage
    if not (root / "ledger.jsonl").is_file() and not (root / "jobs").is_dir():
        return StageCells(stage, None)
    return StageCells(stage, build_report(Ledger(experiments, stage)))


def load_earlier(path: Path) -> tuple[dict[str, Any], dict[CellKey, float]]:
    """The earlier system's table: its document and mean test mse per cell."""
    document = json.loads(path.read_text(encoding="utf-8"))
    cells = {cell_key(r["model"], r["k"], r["lr"], r["weight_decay"]): float(r["test_mse"])
             for r in document["results"]}
    return document, cells


# --------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------
def _fixed(value: float | None) -> str:
    return NONE_TEXT if value is None else f"{value:.4f}"


def _margin(found: Interval | None) -> str:
    return NONE_TEXT if found is None else found.text(signed=True)


def _signed(value: float | None, reference: Any) -> str:
    if value is None or not isinstance(reference, float):
        return NONE_TEXT
    return f"{value - reference:+.4f}"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell_order(key: tuple[Any, ...]) -> tuple[Any, ...]:
    model = key[0]
    rank = MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER)
    return (rank, model, *(sort_key(as_float(v)) for v in key[1:]))


def as_float(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _stage_state(stage: StageCells) -> str:
    if stage.report is None:
        return f"`{stage.name}`: not run yet (no records under experiments/{stage.name}/)"
    counts = stage.report.counts()
    return (f"`{stage.name}`: {counts['finished']} of {len(stage.report.jobs)} jobs "
            f"finished")


def side_by_side(earlier: dict[CellKey, float], earlier_doc: dict[str, Any],
                 legacy: StageCells, today: StageCells,
                 heading: str = "## Side by side per configuration",
                 stages_cells_only: bool = False) -> list[str]:
    """Each cell of the earlier table (or, with ``stages_cells_only``, of the two stages)
    beside the legacy and today's stage, each with its own "no edges"."""
    legacy_cells, today_cells = legacy.cells(), today.cells()
    own = {*legacy_cells, *today_cells}
    keys = sorted(own if stages_cells_only else {*earlier, *own}, key=_cell_order)
    spread = earlier_doc.get("seed_std_max", {})
    earlier_n = len(earlier_doc.get("seeds") or []) or 3
    lines = [
        heading, "",
        f"Test mse, mean ± half-width of the 95 % Student-t interval over seeds (n "
        f"seeds), rounded to what the interval supports, each stage beside its own \"no "
        f"edges\" score (averaged over the same seeds). The earlier system's column is "
        f"its {earlier_n}-seed mean; its \"no edges\" was "
        f"{earlier_doc.get('no_edges_mse', NONE_TEXT)} over all compositions. "
        f"*legacy − earlier* is the difference of means with Welch's unequal-variance t "
        f"test (two-sided p; † where p < {SIGNIFICANCE}); the earlier system's per-cell "
        f"std is not known, so its model's largest stated std stands in for it (n "
        f"{earlier_n}), which makes the test conservative. With three seeds a side the "
        f"test is weak: no † means *not shown to differ*, not *shown equal*. Test sets "
        f"differ between the systems (and between seeds), and \"no edges\" moves with "
        f"them, so the last columns compare each system with its own \"no edges\" (the "
        f"earlier system's: its value over all compositions; tmgg's: per seed, \"no "
        f"edges\" minus the model, as mean ± 95 % interval).", "",
        _md_row(["model", "k", "lr", "wd", "earlier system", f"legacy (`{legacy.name}`)",
                 "legacy no edges", f"today (`{today.name}`)", "today no edges",
                 "legacy − earlier", "earlier: its no edges − it",
                 "legacy: its no edges − it", "today: its no edges − it"]),
        "|---|---:|---:|---:|---:|---|---:|---|---:|---|---:|---|---|",
    ]
    for key in keys:
        old = earlier.get(key)  # type: ignore[arg-type]
        then, now = legacy_cells.get(key), today_cells.get(key)
        gap = NONE_TEXT
        if old is not None and then is not None:
            sd = spread.get(key[0])
            gap = against_earlier(then, old, None if sd is None else float(sd), earlier_n)
        old_no_edges = as_float(earlier_doc.get("no_edges_mse"))
        lines.append(_md_row([
            f"`{key[0]}`", str(key[1]), str(key[2]), str(key[3]), _fixed(old),
            then.text() if then else NONE_TEXT, _fixed(then.no_edges if then else None),
            now.text() if now else NONE_TEXT, _fixed(now.no_edges if now else None), gap,
            _signed(old_no_edges, old) if old is not None else NONE_TEXT,
            _margin(then.below(then.no_edges_values) if then else None),
            _margin(now.below(now.no_edges_values) if now else None)]))
    return [*lines, ""]


def ten_seeds_section(earlier: dict[CellKey, float], earlier_doc: dict[str, Any],
                      legacy10: StageCells, today10: StageCells) -> list[str]:
    """The cells whose three-seed tests were weak, run again with ten seeds (issue 24)."""
    heading = "## Ten seeds"
    if not (legacy10.ran or today10.ran):
        return [heading, "", f"{_stage_state(legacy10)}; {_stage_state(today10)}.", ""]
    lines = side_by_side(earlier, earlier_doc, legacy10, today10, heading,
                         stages_cells_only=True)
    note = (f"The cells of `{legacy10.name}` and `{today10.name}`: the three-seed tests "
            "above could not settle them. Columns as in the side-by-side table; every "
            "interval and test now has the ten seeds of its stage (seeds 1 to 3 repeat "
            "the three-seed stages' jobs), the earlier system's side still its three.")
    return [lines[0], "", note, *lines[1:]]


def _best_by_model(cells: dict[Any, float | None]) -> dict[str, tuple[Any, float]]:
    best: dict[str, tuple[Any, float]] = {}
    for key, value in sorted(cells.items(), key=lambda item: _cell_order(item[0])):
        if value is not None and (key[0] not in best or value < best[key[0]][1]):
            best[key[0]] = (key, value)
    return best


def best_section(earlier: dict[CellKey, float], legacy: StageCells,
                 today: StageCells) -> list[str]:
    sources: list[tuple[str, dict[Any, float | None], dict[Any, Cell]]] = [
        ("earlier system", dict(earlier), {})]
    for label, stage in ((f"legacy (`{legacy.name}`)", legacy),
                         (f"today (`{today.name}`)", today)):
        cells = stage.cells()
        sources.append((label, {key: cell.mean for key, cell in cells.items()}, cells))
    lines = ["## Best configuration per model", "",
             "Lowest mean test mse of each model (tmgg's with its 95 % interval), and the "
             "models in that order of their means; overlapping intervals mean the order "
             "is not resolved by these seeds.", "",
             _md_row(["source", *MODEL_ORDER, "order (best first)"]),
             "|---|---|---|---|---|"]
    for label, means, cells in sources:
        best = _best_by_model(means)
        row = [label]
        for model in MODEL_ORDER:
            if model in best:
                key, value = best[model]
                shown = cells[key].text() if key in cells else f"{value:.4f}"
                row.append(f"{shown} (k {key[1]}, lr {key[2]}, wd {key[3]})")
            else:
                row.append(NONE_TEXT)
        order = sorted(best, key=lambda model: best[model][1])
        row.append(" < ".join(order) if order else NONE_TEXT)
        lines.append(_md_row(row))
    return [*lines, ""]


def ablation_section(ablations: Sequence[StageCells]) -> list[str]:
    lines = ["## Ablations of the legacy variant", "",
             "Each ablation stage keeps every legacy option on but one, which it sweeps "
             "over its legacy and its SPEC.md value (k 8, wd 1e-2, lr 1e-3, 3 seeds). "
             "*Δ* is the row's mean minus the legacy value's mean for the same model, with "
             "the paired t test over the seeds both rows ran (each seed's data, test set "
             "and initial weights are the same on both sides; two-sided p, † where p < "
             f"{SIGNIFICANCE}; Welch's t where the seeds do not pair). An option that "
             "changes the metrics (objective.metrics_diagonal) changes the measure, not the "
             "model: its Δ is not a training effect.", ""]
    ran = [stage for stage in ablations if stage.ran]
    if not ran:
        return [*lines, "No ablation stage has finished jobs yet.", ""]
    for stage in ran:
        assert stage.report is not None
        swept = stage.report.extra_keys
        lines += [f"### `{stage.name}`", ""]
        if len(swept) != 1:
            lines += [f"Swept keys beyond model, lr, wd and k: {swept or 'none'}; expected "
                      "exactly one.", ""]
        label = swept[0] if swept else "(option)"
        cells = stage.cells()
        legacy_value = LEGACY_VALUES.get(label)
        lines += [_md_row(["model", "k", "lr", "wd", LABELS.get(label, label), "test mse",
                           "no edges", "Δ"]),
                  "|---|---:|---:|---:|---|---|---:|---:|"]
        for key in sorted(cells, key=_cell_order):
            cell = cells[key]
            reference = cells.get((*key[:4], legacy_value)) if swept else None
            delta = NONE_TEXT
            if (reference is not None and reference is not cell and cell.mean is not None
                    and reference.mean is not None):
                delta = paired_text(cell, reference)
            lines.append(_md_row([f"`{key[0]}`", str(key[1]), str(key[2]), str(key[3]),
                                  format_value(key[4]) if len(key) > 4 else NONE_TEXT,
                                  cell.text(), _fixed(cell.no_edges), delta]))
        lines.append("")
    return lines


def fp64_section(earlier: dict[CellKey, float], earlier_doc: dict[str, Any],
                 legacy: StageCells, fp64: StageCells) -> list[str]:
    """The legacy stage's cells again in float64, beside float32 and the earlier system:
    does the † gap close when precision is the only change?"""
    lines = [f"## The legacy variant in float64 (`{fp64.name}`)", ""]
    if not fp64.ran:
        return [*lines, f"{_stage_state(fp64)}.", ""]
    spread = earlier_doc.get("seed_std_max", {})
    earlier_n = len(earlier_doc.get("seeds") or []) or 3
    legacy_cells, cells = legacy.cells(), fp64.cells()
    lines += ["The same jobs as the legacy stage with `trainer.precision=64-true` "
              "(eigendecomposition, forward and optimiser in float64), every other legacy "
              "option unchanged, so each row's test sets and \"no edges\" are the legacy "
              "row's. *float64 − float32* is the paired t test over the seeds (the same "
              "seed's data, test set and initial weights in both stages), "
              "*float64 − earlier* and *legacy − earlier* as *legacy − earlier* above (†: "
              f"p < {SIGNIFICANCE}).", "",
              _md_row(["model", "k", "lr", "wd", "earlier system", "legacy float32",
                       "legacy float64", "no edges", "float64 − float32",
                       "legacy − earlier", "float64 − earlier"]),
              "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    for key in sorted(cells, key=_cell_order):
        cell, base, old = cells[key], legacy_cells.get(key[:4]), earlier.get(key[:4])
        columns = []
        for value in (base, cell):
            gap = NONE_TEXT
            if old is not None and value is not None:
                sd = spread.get(key[0])
                gap = against_earlier(value, old, None if sd is None else float(sd),
                                      earlier_n)
            columns.append(gap)
        precision = NONE_TEXT
        if base is not None and base.mean is not None and cell.mean is not None:
            precision = paired_text(cell, base)
        lines.append(_md_row([
            f"`{key[0]}`", str(key[1]), str(key[2]), str(key[3]), _fixed(old),
            base.text() if base else NONE_TEXT, cell.text(), _fixed(cell.no_edges),
            precision, *columns]))
    return [*lines, ""]


def stage1b_section(stage1b: StageCells) -> list[str]:
    lines = ["## Stage 1b: does any model beat \"noisy input\"?", ""]
    if not stage1b.ran:
        return [*lines, f"{_stage_state(stage1b)}.", ""]
    cells = stage1b.cells()
    lines += ["*beats noisy input*: on the mean test mse; *noisy input − it* per seed (the "
              "same test set) as mean ± 95 % interval: the win is shown only where the whole "
              "interval is above 0.", "",
              _md_row(["model", "k", "lr", "wd", "test mse", "no edges", "noisy input",
                       "beats noisy input", "noisy input − it"]),
              "|---|---:|---:|---:|---|---:|---:|---|---|"]
    winners = []
    for key in sorted(cells, key=_cell_order):
        cell = cells[key]
        beats = (cell.mean is not None and cell.noisy_input is not None
                 and cell.mean < cell.noisy_input)
        if beats:
            winners.append((key, cell))
        lines.append(_md_row([f"`{key[0]}`", str(key[1]), str(key[2]), str(key[3]),
                              cell.text(), _fixed(cell.no_edges), _fixed(cell.noisy_input),
                              "yes" if beats else "no",
                              beats_text(cell.below(cell.noisy_input_values))]))
    lines.append("")
    if winners:
        names = ", ".join(f"`{k[0]}` (k {k[1]}, lr {k[2]}, wd {k[3]}: {c.text()} < "
                          f"{c.noisy_input:.4f}; noisy input − it "
                          f"{_margin(c.below(c.noisy_input_values))})" for k, c in winners)
        lines.append(f"**Yes**: {len(winners)} configuration(s) beat \"noisy input\" on "
                     f"their mean test mse: {names}.")
    else:
        scored = [(k, c) for k, c in cells.items() if c.mean is not None]
        best_key, best = min(scored, key=lambda item: (item[1].mean, _cell_order(item[0])))
        lines.append(f"**No**: no configuration beats \"noisy input\". The best is "
                     f"`{best_key[0]}` (k {best_key[1]}, lr {best_key[2]}, wd {best_key[3]}) "
                     f"at {best.text()}, against {_fixed(best.noisy_input)} for "
                     f"\"noisy input\" (noisy input − it per seed: "
                     f"{_margin(best.below(best.noisy_input_values))}).")
    return [*lines, ""]


def comparison_markdown(experiments: Path, earlier_path: Path, today: str, legacy: str,
                        stage1b: str, ablations: Sequence[str] | None = None,
                        fp64: str = "stage1_legacy_fp64",
                        legacy10: str = "stage1_legacy_seeds10",
                        today10: str = "stage1_seeds10") -> str:
    """COMPARISON.md from the records under ``experiments`` and the earlier table."""
    earlier_doc, earlier = load_earlier(earlier_path)
    today_cells, legacy_cells = load_stage(experiments, today), load_stage(experiments, legacy)
    b_cells, fp64_cells = load_stage(experiments, stage1b), load_stage(experiments, fp64)
    if ablations is None:
        ablations = sorted(path.name for path in experiments.glob(f"{ABLATION_PREFIX}*")
                           if path.is_dir())
    ablation_cells = [load_stage(experiments, name) for name in ablations]
    legacy10_cells, today10_cells = (load_stage(experiments, legacy10),
                                     load_stage(experiments, today10))
    lines = [
        "# Stage 1 against the earlier system (issue 14)", "",
        "Written by `tmgg-sweep compare` from the records of the stages below "
        "(`experiments/<stage>/`) and the earlier system's table "
        f"(`{earlier_path.name}`: {earlier_doc.get('provenance', 'no provenance given')}); "
        "regenerate with `tmgg-sweep compare`.", "",
        "Stages:", "",
        *(f"- {_stage_state(stage)}" for stage in
          (today_cells, legacy_cells, b_cells, fp64_cells, *ablation_cells,
           legacy10_cells, today10_cells)), "",
    ]
    lines += side_by_side(earlier, earlier_doc, legacy_cells, today_cells)
    lines += best_section(earlier, legacy_cells, today_cells)
    lines += ablation_section(ablation_cells)
    lines += fp64_section(earlier, earlier_doc, legacy_cells, fp64_cells)
    lines += stage1b_section(b_cells)
    lines += ten_seeds_section(earlier, earlier_doc, legacy10_cells, today10_cells)
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmgg-sweep compare",
        description="Write COMPARISON.md: stage 1 and its legacy variant side by side with "
                    "the earlier system's results, the legacy ablations and stage 1b, from "
                    "the stages' records (issue 14).")
    parser.add_argument("--experiments", type=Path, default=Path("experiments"),
                        help="the experiments folder holding the stage folders")
    parser.add_argument("--earlier", type=Path, default=None,
                        help=f"the earlier system's table (default: <experiments>/"
                             f"{EARLIER_FILE})")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where to write (default: <experiments>/{COMPARISON_FILE})")
    parser.add_argument("--today", default="stage1", help="today's stage-1 stage name")
    parser.add_argument("--legacy", default="stage1_legacy", help="the legacy stage name")
    parser.add_argument("--stage1b", default="stage1b", help="the stage-1b stage name")
    parser.add_argument("--fp64", default="stage1_legacy_fp64",
                        help="the legacy stage's float64 variant")
    parser.add_argument("--legacy10", default="stage1_legacy_seeds10",
                        help="the legacy cells again with ten seeds")
    parser.add_argument("--today10", default="stage1_seeds10",
                        help="stage 1's best cells again with ten seeds")
    parser.add_argument("--ablation", action="append", default=None, metavar="STAGE",
                        help=f"an ablation stage (repeatable; default: every "
                             f"{ABLATION_PREFIX}* folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    experiments = args.experiments
    earlier = args.earlier or experiments / EARLIER_FILE
    if not earlier.is_file():
        print(f"tmgg-sweep compare: the earlier system's table {earlier} is missing",
              file=sys.stderr)
        return 2
    text = comparison_markdown(experiments, earlier, args.today, args.legacy, args.stage1b,
                               args.ablation, args.fp64, args.legacy10, args.today10)
    out = args.out or experiments / COMPARISON_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
