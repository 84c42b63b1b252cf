"""Shared helpers for the pure-core unit tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from toposerve.api.spec import LLMDeploymentSpec

ROOT = Path(__file__).resolve().parents[2]

# No per-example deadline (hypothesis' default is 200 ms): a deadline is a timed assertion, and on
# a loaded 2-core CI machine property tests that run a validator or a real parser per example went
# past it (test_inferencepool's validator/API-server property, during a benchmark). Tests that set
# their own settings keep them.
settings.register_profile("toposerve", deadline=None)
settings.load_profile("toposerve")
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def make_spec(
    model_name: str, ctx: int | None = None, gpus: list[str] | None = None, **extra: Any
) -> LLMDeploymentSpec:
    raw: dict[str, Any] = {"model": {"name": model_name}}
    if ctx is not None:
        raw["model"]["maxContextLength"] = ctx
    if gpus is not None:
        raw.setdefault("placement", {})["gpuTypes"] = gpus
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return LLMDeploymentSpec.model_validate(raw)


@pytest.fixture
def root() -> Path:
    return ROOT
