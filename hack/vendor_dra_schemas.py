"""Vendor NVIDIA's ComputeDomain CRD (DRA driver for GPUs), which the unit suite validates the
rendered ComputeDomains of GB200 multi-node replicas against (render/fabric.py,
tests/unit/test_fabric.py).

The CRD is ``deployments/helm/nvidia-dra-driver-gpu/crds/resource.nvidia.com_computedomains.yaml`` of
``github.com/NVIDIA/k8s-dra-driver-gpu`` at v25.12.0, the newest release under that module path (the
project moved to ``sigs.k8s.io/dra-driver-nvidia-gpu`` with v0.4.0, whose CRD only relaxes this one:
``numNodes`` optional with default 0). v25.12.0 requires ``numNodes``, so validating against it also
checks that the operator sets it.

Like the other vendor scripts this asks the Go module proxy first (``go mod download``); on
2026-12-07 the proxy refused every version of this module ("403 This module version is not
available"), so it falls back to a git checkout of the release tag: ``--git DIR`` (a clone of
https://github.com/NVIDIA/k8s-dra-driver-gpu) reads the file at the tag with ``git show``, without a
work tree or network. The header records where the file came from, with the tag's commit.

usage: python hack/vendor_dra_schemas.py [--git DIR]   (writes tests/unit/schemas/)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

MODULE = ("github.com/NVIDIA/k8s-dra-driver-gpu", "v25.12.0")
CRD = "deployments/helm/nvidia-dra-driver-gpu/crds/resource.nvidia.com_computedomains.yaml"
OUT = Path(__file__).resolve().parents[1] / "tests/unit/schemas"
TARGET = OUT / f"nvidia-dra-driver-gpu-{MODULE[1]}-computedomains.yaml"


def from_proxy() -> tuple[str, str] | None:
    """(CRD text, where from) through the Go module proxy, or None when it does not serve it."""
    done = subprocess.run(
        ["go", "mod", "download", "-json", f"{MODULE[0]}@{MODULE[1]}"], capture_output=True, text=True
    )
    info = json.loads(done.stdout or "{}")
    if done.returncode != 0 or "Dir" not in info:
        print(f"Go module proxy: {info.get('Error', done.stderr.strip())}", file=sys.stderr)
        return None
    return (Path(info["Dir"]) / CRD).read_text(), f"{MODULE[0]}@{MODULE[1]} (Go module proxy)"


def from_git(git_dir: str) -> tuple[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", git_dir, *args], check=True, capture_output=True, text=True
        ).stdout

    commit = git("rev-parse", f"{MODULE[1]}^{{commit}}").strip()
    return git("show", f"{MODULE[1]}:{CRD}"), f"{MODULE[0]} tag {MODULE[1]} (commit {commit}, git)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--git", help="a clone of github.com/NVIDIA/k8s-dra-driver-gpu, used when the proxy fails"
    )
    args = ap.parse_args(argv)
    got = from_proxy()
    if got is None:
        if not args.git:
            print(
                "the Go module proxy does not serve it: pass --git DIR (a clone with tags)", file=sys.stderr
            )
            return 1
        got = from_git(args.git)
    text, source = got
    header = (
        f"# Vendored {datetime.now(UTC).date().isoformat()} by hack/vendor_dra_schemas.py from {source}\n"
        f"# {CRD}. The unit suite validates rendered ComputeDomains against it (tests/unit/test_fabric.py).\n"
    )
    TARGET.write_text(header + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
