"""`toposerve router` arguments and entry point (placeholder until the router lands)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("router: not implemented yet")
