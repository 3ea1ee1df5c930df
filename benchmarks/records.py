"""What the scripts here share about their records: where one goes and whether the machine was
quiet enough to take it.

A record goes under build/ unless --output names another file, so running a script never
changes the tracked benchmarks/results_*.json; to update one, name it with --output and --force.
It is written atomically, and an existing file is replaced only with --force (checked before the
minutes of work).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evit_deploy.errors import EvitDeployError
from evit_deploy.fileio import check_can_write, write_bytes_atomic
from evit_deploy.stats import load_warning


def output_options(parser: argparse.ArgumentParser, name: str) -> None:
    """--output (default build/NAME; benchmarks/NAME is the tracked record) and --force."""
    parser.add_argument(
        "--output", type=Path, default=Path("build") / name,
        help=f"where the JSON record goes (default build/{name}; the tracked one: benchmarks/{name})",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --output")


def check_output(args: argparse.Namespace) -> None:
    """Refuse an existing --output without --force before any work, in one line."""
    try:
        check_can_write(args.output, args.force)
    except EvitDeployError as exc:
        raise SystemExit(f"error: {exc}") from None


def write_record(args: argparse.Namespace, record: dict) -> None:
    write_bytes_atomic(args.output, (json.dumps(record, indent=2) + "\n").encode(), args.force)
    print(f"wrote {args.output}", flush=True)


def warn_if_busy() -> None:
    """Before timing, and before the script's own exports raise the load themselves."""
    note = load_warning()
    if note:
        print(f"warning: {note}", flush=True)
