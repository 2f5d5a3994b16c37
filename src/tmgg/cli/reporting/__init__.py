"""Stage reports: what a sweep found, read from its ledger (``tmgg-sweep report``).

Researchers read results, not ledgers: ``write_report`` turns ``experiments/<stage>/``
into ``REPORT.md`` with a results table, the reference scores, outcome counts and
PNG plots. Matplotlib is imported only while plotting.
"""

from tmgg.cli.reporting.report import StageReport, build_report, write_report

__all__ = ["StageReport", "build_report", "write_report"]
