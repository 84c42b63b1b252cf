"""Fault injection: the failure modes reliability tests need an engine to show on demand.

Each mode models something real: ``fail_rate`` an engine returning 5xx (CUDA error, OOM),
``poison`` a "query of death" (every request whose prompt contains that text fails with
``fail_status``, on every replica alike: what a router must not blame on the backend),
``hang_rate`` a wedged engine that accepts but never answers (NCCL hang), ``die_rate`` a pod
killed mid-stream, ``unready`` a failing readiness probe, ``slowdown`` thermal throttling
(every step takes longer), and ``health_delay`` an engine whose ``/health`` answers late because
its API server's event loop is busy (a long prefill, thousands of streams: vLLM serves /health
on the same loop), which probes with the kubelet's 1 s default take for a dead engine. Decisions draw from a seeded RNG so a test run is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum


class Fate(Enum):
    OK = "ok"
    FAIL = "fail"
    HANG = "hang"
    DIE = "die"


@dataclass(frozen=True)
class FaultConfig:
    fail_rate: float = 0.0
    fail_status: int = 500
    hang_rate: float = 0.0
    die_rate: float = 0.0
    die_after_tokens: int = 1
    unready: bool = False
    slowdown: float = 1.0
    poison: str = ""  # non-empty: prompts containing it fail with fail_status
    health_delay: float = 0.0  # seconds /health waits before answering while requests run

    def __post_init__(self) -> None:
        for name in ("fail_rate", "hang_rate", "die_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {v}")
        if self.slowdown <= 0:
            raise ValueError("slowdown must be positive")
        if not 0.0 <= self.health_delay <= 600:
            raise ValueError("health_delay must be within [0, 600] seconds")
        if not 400 <= self.fail_status <= 599:
            raise ValueError("fail_status must be an HTTP error status (400-599)")
        if self.die_after_tokens < 0:
            raise ValueError("die_after_tokens must be >= 0")

    def updated(self, changes: Mapping[str, object]) -> FaultConfig:
        """A copy with ``changes`` applied; unknown keys or wrong types raise ValueError."""
        known = {f.name: f.type for f in fields(self)}
        clean: dict[str, object] = {}
        for k, v in changes.items():
            if k not in known:
                raise ValueError(f"unknown fault field {k!r}; known: {', '.join(known)}")
            current = getattr(self, k)
            if isinstance(current, str):
                if not isinstance(v, str):
                    raise ValueError(f"{k} must be a string")
            elif isinstance(current, bool):
                if not isinstance(v, bool):
                    raise ValueError(f"{k} must be a boolean")
            elif isinstance(current, int):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"{k} must be an integer")
            elif isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"{k} must be a number")
            clean[k] = float(v) if isinstance(current, float) else v
        return replace(self, **clean)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class FaultInjector:
    """Holds the live fault config and decides each request's fate reproducibly."""

    def __init__(self, config: FaultConfig | None = None, seed: int = 0) -> None:
        self.config = config or FaultConfig()
        self._rng = random.Random(seed)

    def poisoned(self, prompt_text: str | None) -> bool:
        p = self.config.poison
        return bool(p) and prompt_text is not None and p in prompt_text

    def fate(self) -> Fate:
        c = self.config
        if c.fail_rate and self._rng.random() < c.fail_rate:
            return Fate.FAIL
        if c.hang_rate and self._rng.random() < c.hang_rate:
            return Fate.HANG
        if c.die_rate and self._rng.random() < c.die_rate:
            return Fate.DIE
        return Fate.OK
