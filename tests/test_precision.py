"""Issue 24: means with their 95 % t interval, rounded to what it supports; Welch's t
instead of a one-SD rule; "noisy input" per noise level."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from tmgg.cli.reporting.precision import (
    decimals_for,
    interval,
    paired_difference,
    paired_t,
    t_cdf,
    t_quantile,
    welch,
    welch_samples,
)


def _density(x: float, df: float) -> float:
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) \
        / math.sqrt(df * math.pi) * (1 + x * x / df) ** (-(df + 1) / 2)


def _cdf_by_simpson(t: float, df: float, steps: int = 20000) -> float:
    """An independent check: 1/2 + the integral of the density from 0 to t."""
    h = t / steps
    total = _density(0, df) + _density(t, df)
    total += sum((4 if i % 2 else 2) * _density(i * h, df) for i in range(1, steps))
    return 0.5 + total * h / 3


@pytest.mark.parametrize(("df", "expected"), [
    (1, 12.706204736), (2, 4.302652730), (3, 3.182446305), (9, 2.262157163),
    (30, 2.042272456), (1000, 1.962339081)])
def test_t_quantile_matches_tables(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-8)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-8)


@pytest.mark.parametrize("df", [1, 2, 2.7, 5, 11.3, 40])
@pytest.mark.parametrize("t", [0.1, 0.9, 2.0, 4.5])
def test_t_cdf_matches_the_integral_of_the_density(df: float, t: float) -> None:
    assert t_cdf(t, df) == pytest.approx(_cdf_by_simpson(t, df), abs=1e-9)
    assert t_cdf(-t, df) == pytest.approx(1 - t_cdf(t, df), abs=1e-12)


def test_decimals_follow_the_half_width() -> None:
    assert decimals_for(0.0123) == 3
    assert decimals_for(0.16) == 2
    assert decimals_for(0.0049) == 4
    assert decimals_for(3.2) == 1
    assert decimals_for(None) == 4 and decimals_for(0.0) == 4


def test_interval_of_three_seeds() -> None:
    values = [0.31, 0.33, 0.35]
    found = interval(values)
    assert found is not None and found.n == 3
    standard_error = statistics.stdev(values) / math.sqrt(3)
    assert found.half_width == pytest.approx(4.302652730 * standard_error)
    assert found.text() == "0.330 ± 0.050 (n 3)"
    assert interval([0.3]).text() == "0.3000 (n 1)"  # type: ignore[union-attr]
    assert interval([]) is None
    margin = paired_difference([0.34, 0.35, 0.36], [0.30, 0.31, 0.33])
    assert margin is not None and margin.mean == pytest.approx(0.0366667)


def test_welch_t_test() -> None:
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    result = welch_samples(a, b)
    assert result is not None
    # t = -3 / sqrt(2.5/5 + 10/5); Welch-Satterthwaite df = 2.5^2 / (0.5^2/4 + 2^2/4)
    assert result.t == pytest.approx(-3 / math.sqrt(2.5))
    assert result.df == pytest.approx(6.25 / 1.0625)
    assert result.p == pytest.approx(2 * (1 - _cdf_by_simpson(abs(result.t), result.df)),
                                     abs=1e-8)
    assert 0.10 < result.p < 0.11
    assert welch(0.3, 0.0, 3, 0.3, 0.0, 3) is None  # no spread: no test
    assert welch(0.3, 0.01, 1, 0.3, 0.01, 3) is None
    assert "Welch t" in result.text() and "p 0.1" in result.text()


def test_paired_t_test() -> None:
    """Differences 1, 2, 3: t = 2 / (1 / sqrt 3), df 2, where the t cdf has a closed
    form (1/2 + t / (2 sqrt(2 + t^2)))."""
    result = paired_t([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert result is not None and result.test == "paired"
    assert result.difference == pytest.approx(2.0)
    assert result.t == pytest.approx(2.0 * math.sqrt(3.0)) and result.df == 2
    t = result.t
    assert result.p == pytest.approx(1.0 - t / math.sqrt(2.0 + t * t), abs=1e-9)
    assert result.text() == "paired t +3.46, df 2, p 0.074"
    # Pairing removes the seeds' shared spread that Welch's test keeps.
    shifted = [0.30, 0.35, 0.40]
    assert paired_t([v + 0.01 for v in shifted[:2]] + [0.411], shifted).p < 0.01  # type: ignore[union-attr]
    assert welch_samples([v + 0.01 for v in shifted[:2]] + [0.411], shifted).p > 0.5  # type: ignore[union-attr]
    assert paired_t([0.3], [0.2]) is None  # one pair: no test
    assert paired_t([0.3, 0.4], [0.2, 0.3]) is None  # no spread in the differences


def test_noisy_input_reference_is_logged_per_noise_level() -> None:
    from tmgg.task.module import GraphDenoisingData, reference_metrics

    partitions = {"name": "sbm_partitions", "num_nodes": 12, "min_blocks": 2,
                  "max_blocks": 3, "min_block_size": 2, "max_block_size": 8,
                  "num_train_graphs": 4, "num_val_graphs": 2, "num_test_graphs": 4,
                  "samples_per_epoch": 16, "val_samples": 8, "test_samples": 8,
                  "batch_size": 4, "self_loops": False, "test_split": "disjoint"}
    data = GraphDenoisingData(partitions, [0.01, 0.3], seed=3, max_steps=4)
    data.setup()
    scores = reference_metrics(data.test_levels, "test")
    low, high = (scores[f"test_eps{e}_reference_noisy_input/mse"] for e in ("0.01", "0.3"))
    assert low < high  # more flips, more error: the level's own reference
    assert scores["test_reference_noisy_input/mse"] == pytest.approx((low + high) / 2,
                                                                     rel=1e-6)
    level = data.test_levels[1]
    assert high == pytest.approx(float(torch.ne(level.noisy, level.clean).float().mean()),
                                 abs=0.05)
