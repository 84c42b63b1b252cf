"""Shared helpers for the pure-core unit tests."""

from __future__ import annotations

import gc
from collections.abc import Iterator
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


@pytest.fixture(autouse=True)
def _collect_other_tests_garbage(request: pytest.FixtureRequest) -> Iterator[None]:
    """Before a test that reads its log records, collect what earlier tests left unreachable: an
    HTTP client (the openai SDK's) that a test did not close is otherwise collected at a random
    later moment, and its failed close logs an asyncio ERROR ("Task exception was never
    retrieved ... Event loop is closed") into whichever test runs then (seen failing
    test_router_hostile's "no error logged" check in a clean-clone run). Collected here, in
    setup, those records stay out of the test's own."""
    if "caplog" in request.fixturenames:
        gc.collect()
    yield
