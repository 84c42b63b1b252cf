"""Run the real `helm` binary on charts/toposerve (shared by the chart tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "toposerve"
# The local cluster's version (hack/cluster/versions.sh). A helm built with `go install` defaults
# to v1.20 for `template`, below the chart's kubeVersion.
KUBE_VERSION = "1.35.4"


def _cluster_bin() -> Path:
    """hack/cluster/versions.sh's CLUSTER_BIN, where `make cluster-bin` builds helm."""
    text = (ROOT / "hack/cluster/versions.sh").read_text()
    version = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("K8S_VERSION="))
    cache = os.environ.get("TOPOSERVE_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "toposerve"
    )
    return Path(os.environ.get("CLUSTER_BIN") or Path(cache) / f"k8s-{version}" / "bin")


def helm_binary() -> str:
    """The helm binary, or a loud skip: `make test` builds it (make cluster-bin), so CI always has it."""
    candidate = _cluster_bin() / "helm"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("helm")
    if found:
        return found
    msg = f"HELM MISSING: {candidate} not built (run `make cluster-bin`); chart tests SKIPPED"
    warnings.warn(msg, stacklevel=2)
    pytest.skip(msg)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HELM_CACHE_HOME": "/tmp/toposerve-helm/cache",
           "HELM_CONFIG_HOME": "/tmp/toposerve-helm/config", "HELM_DATA_HOME": "/tmp/toposerve-helm/data"}  # fmt: skip
    proc = subprocess.run([helm_binary(), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def template(
    values: dict[str, Any] | None = None,
    namespace: str = "toposerve-system",
    api_versions: Iterable[str] = (),
    release: str = "toposerve",
) -> list[dict[str, Any]]:
    """`helm template` with the given values; the rendered objects (CRDs included)."""
    args = ["template", release, str(CHART), "--namespace", namespace, "--include-crds"]
    args += ["--kube-version", KUBE_VERSION]
    for v in api_versions:
        args += ["--api-versions", v]
    if values:
        args += ["--values", "-"]
        proc = subprocess.run(
            [helm_binary(), *args],
            input=yaml.safe_dump(values),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise AssertionError(f"helm template failed:\n{proc.stderr}")
        out = proc.stdout
    else:
        out = helm(*args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def template_error(values: dict[str, Any]) -> str:
    """stderr of a `helm template` that must fail (values rejected)."""
    proc = subprocess.run(
        [helm_binary(), "template", "t", str(CHART), "--kube-version", KUBE_VERSION, "--values", "-"],
        input=yaml.safe_dump(values),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0, f"helm accepted bad values {values}"
    return proc.stderr


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o.get("kind") == kind]
