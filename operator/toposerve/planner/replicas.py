"""Split spec.replicas over pools by weight (largest remainder, ties to the earlier pool).

Deterministic and exact: the shares always sum to the total when any weight is positive, so the
scale subresource's single number is the only replica count anyone writes.
"""

from __future__ import annotations

from collections.abc import Sequence


def distribute(total: int, weights: Sequence[tuple[str, int]]) -> dict[str, int]:
    """Shares of ``total`` for each (name, weight); all zero when no weight is positive."""
    positive = sum(w for _, w in weights if w > 0)
    if total <= 0 or positive == 0:
        return {name: 0 for name, _ in weights}
    exact = [(name, total * w / positive if w > 0 else 0.0) for name, w in weights]
    shares = {name: int(x) for name, x in exact}
    left = total - sum(shares.values())
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i][1] - int(exact[i][1])), i))
    for i in order[:left]:
        shares[exact[i][0]] += 1
    return shares
