"""`make install` (uv, from the lock) against the pip path it replaced, side by side.

Each path installs into a fresh clone of this repository's HEAD, from scratch (no
.venv), in the same run and with the same package caches:

- pip (baseline): ``python3 -m venv .venv``, ``.venv/bin/python -m pip install
  torch==2.13.0``, ``.venv/bin/python -m pip install -e ".[dev]"``;
- uv: ``make install``.

``--warmup`` first runs each path once untimed, so both caches are warm. Prints the
seconds of each path and the ratio pip / uv; ``--json`` writes them too.

    .venv/bin/python benchmarks/bench_install.py --warmup --json /tmp/tmgg-bench/install.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = [
    ["python3", "-m", "venv", ".venv"],
    [".venv/bin/python", "-m", "pip", "install", "--quiet", "torch==2.13.0"],
    [".venv/bin/python", "-m", "pip", "install", "--quiet", "-e", ".[dev]"],
]
UV_PATH = [["make", "--no-print-directory", "install"]]


def _environment() -> dict[str, str]:
    """This machine's environment without an active virtualenv or an outer make."""
    drop = ("VIRTUAL_ENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "PYTHONPATH")
    env = {key: value for key, value in os.environ.items() if key not in drop}
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p != venv_bin)
    return env


def timed_install(commands: list[list[str]], workdir: Path) -> float:
    """Seconds to run ``commands`` in a fresh clone under ``workdir``."""
    clone = workdir / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    env = _environment()
    started = time.perf_counter()
    for command in commands:
        subprocess.run(command, cwd=clone, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def measure(commands: list[list[str]]) -> float:
    with tempfile.TemporaryDirectory(prefix="tmgg-bench-install-") as tmp:
        return timed_install(commands, Path(tmp))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", action="store_true",
                        help="run each path once untimed first (warms both caches)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    if args.warmup:
        measure(BASELINE)
        measure(UV_PATH)
    pip_s = measure(BASELINE)
    uv_s = measure(UV_PATH)
    figures = {"pip_seconds": round(pip_s, 1), "uv_make_install_seconds": round(uv_s, 1),
               "speedup": round(pip_s / uv_s, 2)}
    print(f"pip path {pip_s:.1f}s, make install (uv) {uv_s:.1f}s: "
          f"{pip_s / uv_s:.2f}x faster")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
