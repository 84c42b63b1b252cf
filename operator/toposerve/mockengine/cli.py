"""`toposerve mock-engine` arguments and entry point (placeholder until the mock engine lands)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default="mock")


def run(args: argparse.Namespace) -> int:
    raise SystemExit("mock-engine: not implemented yet")
