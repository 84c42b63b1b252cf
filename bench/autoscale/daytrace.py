"""A seeded, day-shaped request trace: quiet nights, a morning ramp, a midday plateau, random
spikes and an evening decay, repeated over several days so a forecast has history to learn from.

Arrivals are a non-homogeneous Poisson process (thinning against the day's peak rate); prompt and
output lengths are log-normal and clipped, like chat/RAG traffic. Plain Python (no numpy) so the
product's virtualenv runs it; a week is about a million requests and takes a few seconds.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

DAY = 86400.0


@dataclass(frozen=True)
class TraceConfig:
    days: int = 7
    seed: int = 1
    night_rps: float = 0.3  # 00:00-06:00 and from 22:00
    peak_rps: float = 3.6  # the midday plateau
    lunch_dip: float = 0.85  # 12:00-13:00 runs at this share of the plateau
    day_jitter: float = 0.1  # each day's plateau is peak_rps x U(1 - j, 1 + j)
    spikes_per_day: int = 2
    spike_factor: float = 1.6  # the rate during a spike, as a multiple of the rate without it
    spike_seconds: float = 600.0
    spike_hours: tuple[float, float] = (8.0, 20.0)  # spikes start within these hours
    prompt_median: float = 1000.0
    prompt_sigma: float = 0.6
    prompt_clip: tuple[int, int] = (32, 6000)
    output_median: float = 150.0
    output_sigma: float = 0.7
    output_clip: tuple[int, int] = (8, 1024)

    def __post_init__(self) -> None:
        if self.days < 1:
            raise ValueError(f"days must be >= 1, got {self.days}")
        if self.night_rps < 0 or self.peak_rps <= 0:
            raise ValueError("night_rps must be >= 0 and peak_rps > 0")
        if self.spike_factor < 1 or self.spike_seconds <= 0:
            raise ValueError("spike_factor must be >= 1 and spike_seconds > 0")


@dataclass(frozen=True)
class Spike:
    start: float  # seconds since the trace began
    end: float


@dataclass(frozen=True)
class Trace:
    """Requests sorted by arrival; parallel lists keep a million of them cheap."""

    arrival: list[float]
    prompt: list[int]
    output: list[int]
    spikes: tuple[Spike, ...]
    config: TraceConfig
    day_scale: tuple[float, ...]  # each day's plateau multiplier

    def __len__(self) -> int:
        return len(self.arrival)

    @property
    def duration(self) -> float:
        return self.config.days * DAY


def _smooth(x: float) -> float:
    """0 -> 1 on [0, 1] with zero slope at both ends (a cosine ramp)."""
    x = min(1.0, max(0.0, x))
    return 0.5 - 0.5 * math.cos(math.pi * x)


def base_rate(hour: float, night: float, plateau: float, lunch_dip: float) -> float:
    """Requests per second at ``hour`` (0..24) of a day whose plateau is ``plateau``."""
    if hour < 6.0 or hour >= 22.0:
        return night
    if hour < 9.0:  # morning ramp 06:00-09:00
        return night + (plateau - night) * _smooth((hour - 6.0) / 3.0)
    if 12.0 <= hour < 13.0:
        return plateau * lunch_dip
    if hour < 17.0:
        return plateau
    return plateau + (night - plateau) * _smooth((hour - 17.0) / 5.0)  # evening decay 17:00-22:00


def rate_at(t: float, cfg: TraceConfig, day_scale: tuple[float, ...], spikes: tuple[Spike, ...]) -> float:
    day = min(int(t // DAY), len(day_scale) - 1)
    r = base_rate((t % DAY) / 3600.0, cfg.night_rps, cfg.peak_rps * day_scale[day], cfg.lunch_dip)
    if any(s.start <= t < s.end for s in spikes):
        r *= cfg.spike_factor
    return r


def _lognormal(rng: random.Random, median: float, sigma: float, clip: tuple[int, int]) -> int:
    return int(min(clip[1], max(clip[0], round(rng.lognormvariate(math.log(median), sigma)))))


def generate(cfg: TraceConfig) -> Trace:
    """The whole trace, deterministic for a given config (seed included)."""
    rng = random.Random(cfg.seed)
    day_scale = tuple(rng.uniform(1 - cfg.day_jitter, 1 + cfg.day_jitter) for _ in range(cfg.days))
    spikes: list[Spike] = []
    lo, hi = cfg.spike_hours
    for d in range(cfg.days):
        for _ in range(cfg.spikes_per_day):
            start = d * DAY + rng.uniform(lo, hi) * 3600.0
            spikes.append(Spike(start, start + cfg.spike_seconds))
    spikes.sort(key=lambda s: s.start)
    spk = tuple(spikes)
    top = cfg.peak_rps * (1 + cfg.day_jitter) * cfg.spike_factor + cfg.night_rps
    arrival: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    t, end = 0.0, cfg.days * DAY
    while True:
        t += rng.expovariate(top)
        if t >= end:
            break
        if rng.random() * top < rate_at(t, cfg, day_scale, spk):
            arrival.append(t)
            prompt.append(_lognormal(rng, cfg.prompt_median, cfg.prompt_sigma, cfg.prompt_clip))
            output.append(_lognormal(rng, cfg.output_median, cfg.output_sigma, cfg.output_clip))
    return Trace(arrival, prompt, output, spk, cfg, day_scale)
