"""Lease expiry is judged by our own clock (how long the record has not changed), never by the
other holder's renewTime, so skewed clocks neither steal a live lease nor keep a dead one."""

from __future__ import annotations

import copy
from typing import Any

from kubernetes.client.exceptions import ApiException

from toposerve.controller.operator import LEASE_SECONDS, Elector


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeKube:
    """One Lease with resourceVersion checks, like the API server."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.rv = 0

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.lease)

    def request(self, method: str, url: str, body: Any = None, **_: Any) -> Any:
        if method == "POST":
            if self.lease is not None:
                raise ApiException(status=409)
        elif body["metadata"].get("resourceVersion") != str(self.rv):
            raise ApiException(status=409)
        self.rv += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.rv)
        return copy.deepcopy(self.lease)

    def held_by(self, holder: str, renew: str) -> None:
        """Someone else writes the lease (a renewal with their wall clock)."""
        self.rv += 1
        spec = {"holderIdentity": holder, "renewTime": renew, "leaseDurationSeconds": LEASE_SECONDS}
        self.lease = {
            "metadata": {"name": "l", "namespace": "ns", "resourceVersion": str(self.rv)},
            "spec": spec,
        }


def elector(kube: FakeKube, clock: Clock, me: str = "me") -> Elector:
    return Elector(kube, "ns", "l", me, clock=clock)  # type: ignore[arg-type]


def test_a_lease_renewed_long_ago_by_their_clock_is_not_stolen_while_it_keeps_changing() -> None:
    kube, clock = FakeKube(), Clock()
    e = elector(kube, clock)
    for i in range(10):  # the holder's clock is a year behind, but it renews every 5 s
        kube.held_by("other", f"2025-12-01T10:00:{i:02d}.000000Z")
        assert not e.try_lead()
        clock.t += 5
    assert kube.lease is not None and kube.lease["spec"]["holderIdentity"] == "other"


def test_a_lease_whose_holder_stopped_is_taken_after_one_duration_by_our_clock() -> None:
    kube, clock = FakeKube(), Clock()
    e = elector(kube, clock)
    kube.held_by("other", "2099-01-01T00:00:00.000000Z")  # their clock runs decades ahead
    assert not e.try_lead()  # first sight: the duration starts now, whatever renewTime says
    clock.t += LEASE_SECONDS - 1
    assert not e.try_lead()
    clock.t += 2
    assert e.try_lead()
    assert kube.lease is not None
    assert kube.lease["spec"]["holderIdentity"] == "me"
    assert kube.lease["spec"]["leaseTransitions"] == 1


def test_a_renewal_restarts_the_wait() -> None:
    kube, clock = FakeKube(), Clock()
    e = elector(kube, clock)
    kube.held_by("other", "t1")
    assert not e.try_lead()
    clock.t += LEASE_SECONDS - 1
    kube.held_by("other", "t2")
    assert not e.try_lead()
    clock.t += LEASE_SECONDS - 1
    assert not e.try_lead()  # 2 x duration since first sight, but only duration - 1 since the renewal
    clock.t += 2
    assert e.try_lead()


def test_the_holder_renews_and_a_free_lease_is_taken_at_once() -> None:
    kube, clock = FakeKube(), Clock()
    e = elector(kube, clock)
    assert e.try_lead()  # no lease: created
    clock.t += 5
    assert e.try_lead()  # ours: renewed
    kube.held_by("", "t")  # released
    assert e.try_lead()


def test_two_candidates_racing_for_an_expired_lease_get_one_winner() -> None:
    kube, clock = FakeKube(), Clock()
    a, b = elector(kube, clock, "a"), elector(kube, clock, "b")
    kube.held_by("dead", "t")
    assert not a.try_lead() and not b.try_lead()
    clock.t += LEASE_SECONDS + 1
    stale = copy.deepcopy(kube.lease)
    assert a.try_lead()
    kube_get = kube.get
    kube.get = lambda *args: copy.deepcopy(stale)  # type: ignore[method-assign]  # b read before a wrote
    assert not b.try_lead()  # its write carries the old resourceVersion: 409
    kube.get = kube_get  # type: ignore[method-assign]
    assert kube.lease is not None and kube.lease["spec"]["holderIdentity"] == "a"
