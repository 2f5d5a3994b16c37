"""MkDocs hook: the committed experiment write-ups become pages of the site.

MkDocs reads only docs/; the reports live in experiments/ beside the ledgers they are
written from, and must stay there (``tmgg-sweep report`` rewrites them). This hook adds
every ``experiments/**/*.md`` and the plots they show to the site under
``experiments/``, so the results pages link to them and ``mkdocs build --strict``
checks those links like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
PUBLISHED = ("*.md", "*.png")
# Stages whose records are checks, not research, and are never committed (.gitignore).
UNPUBLISHED = {"smoke", "adhoc", "bench"}


def on_files(files: Files, config: Any) -> Files:
    for pattern in PUBLISHED:
        for path in sorted(EXPERIMENTS.rglob(pattern)):
            if path.relative_to(EXPERIMENTS).parts[0] in UNPUBLISHED:
                continue
            files.append(File(str(path.relative_to(REPO)), src_dir=str(REPO),
                              dest_dir=config["site_dir"],
                              use_directory_urls=config["use_directory_urls"]))
    return files
