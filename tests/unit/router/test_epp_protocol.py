"""The Endpoint Picker's pure core (router/epp/protocol.py): ext_proc events as plain data in,
answers out. The expected message order is the reference picker's (GIE v1.6.2,
pkg/lwepp/handlers/server.go): the headers answer (the pick) waits for the body's end, the body
is echoed after it in chunks of at most 62,000 bytes (pkg/common/envoy/chunking.go)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from toposerve.router.epp import protocol as pr

HEADERS = [(":method", "POST"), (":path", "/v1/chat/completions?x=1"), ("Content-Type", "application/json")]
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def subset_md(value: object) -> dict[str, object]:
    return {pr.SUBSET_NAMESPACE: {pr.SUBSET_KEY: value}}


def test_headers_then_body_asks_once_and_answers_the_pick_before_the_echoed_body() -> None:
    ex = pr.Exchange()
    assert ex.request_headers(HEADERS, False, {}) == pr.Reaction()
    r = ex.request_body(BODY, True)
    assert r.out == () and r.pick is not None
    assert r.pick.path == "/v1/chat/completions"
    assert r.pick.headers["content-type"] == "application/json"
    assert r.pick.body["model"] == "m" and r.pick.subset is None
    r = ex.decided(pr.Routed(("10.0.0.1:8000", "10.0.0.2:8000")))
    assert r.out == (
        pr.RouteAnswer("10.0.0.1:8000,10.0.0.2:8000"),
        pr.BodyAnswer(pr.REQUEST, BODY, True),
    )


def test_bodiless_request_is_picked_at_its_headers_with_an_empty_body() -> None:
    ex = pr.Exchange()
    r = ex.request_headers([(":path", "/v1/models"), (":method", "GET")], True, {})
    assert r.pick is not None and r.pick.body == {}
    assert ex.decided(pr.Routed(("10.0.0.1:8000",))).out == (pr.RouteAnswer("10.0.0.1:8000"),)


def test_an_empty_last_body_message_still_gets_its_body_answer() -> None:
    ex = pr.Exchange()
    ex.request_headers(HEADERS, False, {})
    r = ex.request_body(b"", True)
    assert r.pick is not None and r.pick.body == {}
    assert ex.decided(pr.Routed(("a:1",))).out == (
        pr.RouteAnswer("a:1"),
        pr.BodyAnswer(pr.REQUEST, b"", True),
    )


@given(hs.lists(hs.integers(0, 150_000), max_size=6), hs.integers(0, 200_000))
def test_streamed_chunks_are_held_back_then_echoed_whole_in_bounded_pieces(
    cuts: list[int], size: int
) -> None:
    body = json.dumps({"p": "x" * size}).encode()
    points = sorted({min(c, len(body)) for c in cuts})
    parts = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    ex = pr.Exchange()
    ex.request_headers(HEADERS, False, {})
    for part in parts[:-1]:
        assert ex.request_body(part, False) == pr.Reaction()  # nothing before the headers answer
    r = ex.request_body(parts[-1], True)
    assert r.pick is not None and r.pick.body == {"p": "x" * size}
    out = ex.decided(pr.Routed(("a:1",))).out
    assert out[0] == pr.RouteAnswer("a:1")
    echoed = [o for o in out[1:] if isinstance(o, pr.BodyAnswer)]
    assert len(echoed) == len(out) - 1
    assert b"".join(o.data for o in echoed) == body
    assert all(len(o.data) <= pr.BODY_CHUNK for o in echoed)
    assert [o.end_of_stream for o in echoed] == [False] * (len(echoed) - 1) + [True]


def test_a_refusal_is_the_only_answer_and_holds_nothing() -> None:
    ex = pr.Exchange()
    ex.request_headers(HEADERS, False, {})
    ex.request_body(BODY, True)
    r = ex.decided(pr.Refused(429, b'{"error":{}}', (("retry-after", "1"),)))
    assert r.out == (pr.Immediate(429, b'{"error":{}}', (("retry-after", "1"),)),)
    assert not ex.response_body(b"", True).done and not ex.broken().done


def test_bad_json_is_a_400_and_an_oversized_body_a_413_without_a_pick() -> None:
    ex = pr.Exchange()
    ex.request_headers(HEADERS, False, {})
    r = ex.request_body(b"[1, 2]", True)
    assert r.pick is None and isinstance(r.out[0], pr.Immediate) and r.out[0].status == 400
    assert b"JSON object" in r.out[0].body
    ex = pr.Exchange(max_body_bytes=10)
    ex.request_headers(HEADERS, False, {})
    assert ex.request_body(b"12345", False) == pr.Reaction()
    r = ex.request_body(b"123456", True)
    assert r.pick is None and r.out[0] == pr.Immediate(413, r.out[0].body) and b"10 bytes" in r.out[0].body
    assert ex.request_body(b"more", True) == pr.Reaction()  # Envoy may still send: ignored


def test_load_is_released_exactly_once_at_the_response_end_or_when_the_stream_breaks() -> None:
    ex = pr.Exchange()
    ex.request_headers(HEADERS, True, {})
    ex.decided(pr.Routed(("a:1",)))
    md = {pr.DESTINATION_NAMESPACE: {pr.SERVED_KEY: " 10.0.0.2:8000 "}}
    r = ex.response_headers(False, md)
    assert r.served == "10.0.0.2:8000" and not r.done and r.out == (pr.HeadersPassed(pr.RESPONSE),)
    assert ex.response_body(b"data: x\n\n", False) == pr.Reaction(
        (pr.BodyAnswer(pr.RESPONSE, b"data: x\n\n", False),)
    )
    assert ex.response_body(b"", True).done
    assert not ex.broken().done  # already released
    ex = pr.Exchange()
    ex.request_headers(HEADERS, True, {})
    ex.decided(pr.Routed(("a:1",)))
    assert ex.broken().done  # Envoy went away mid-response
    ex = pr.Exchange()
    ex.request_headers(HEADERS, True, {})
    ex.decided(pr.Routed(("a:1",)))
    assert ex.response_headers(True, {}).done  # a bodiless response ends at its headers
    ex = pr.Exchange()
    ex.request_headers(HEADERS, True, {})
    ex.decided(pr.Routed(("a:1",)))
    ex.response_body(b"x", False)
    assert ex.trailers(pr.RESPONSE).done


def test_out_of_order_messages_are_protocol_errors() -> None:
    with pytest.raises(pr.ProtocolError):
        pr.Exchange().request_body(b"x", True)
    ex = pr.Exchange()
    ex.request_headers(HEADERS, False, {})
    with pytest.raises(pr.ProtocolError):
        ex.request_headers(HEADERS, False, {})
    with pytest.raises(pr.ProtocolError):
        ex.decided(pr.Routed(("a:1",)))  # nothing was asked
    ex.request_body(BODY, True)
    with pytest.raises(pr.ProtocolError):
        ex.request_body(b"x", True)


@pytest.mark.parametrize(
    ("md", "want"),
    [
        ({}, None),
        ({pr.SUBSET_NAMESPACE: {}}, None),
        ({pr.SUBSET_NAMESPACE: {"other": 1}}, None),
        (subset_md(["10.0.0.1:8000", "10.0.0.2:8000"]), {"10.0.0.1:8000", "10.0.0.2:8000"}),
        (subset_md("10.0.0.1:8000, 10.0.0.2:8000"), {"10.0.0.1:8000", "10.0.0.2:8000"}),
        (subset_md(["10.0.0.1:8000,10.0.0.2:8000", 7]), {"10.0.0.1:8000", "10.0.0.2:8000"}),
        (subset_md([]), set()),
        (subset_md(""), set()),
        (subset_md(None), set()),
    ],
)
def test_subset_is_read_as_the_reference_picker_reads_it(
    md: dict[str, object], want: set[str] | None
) -> None:
    got = pr.parse_subset(md)
    assert got == (None if want is None else frozenset(want))
    ex = pr.Exchange()
    r = ex.request_headers(HEADERS, True, md)
    assert r.pick is not None and r.pick.subset == got


@pytest.mark.parametrize(
    ("endpoint", "subset", "inside"),
    [
        ("10.0.0.1:8000", ["10.0.0.1:8000"], True),
        ("10.0.0.1:8000", ["10.0.0.1:8001"], False),
        ("10.0.0.1:8000", ["10.0.0.1"], True),  # a bare IP: every port of it
        ("10.0.0.10:8000", ["10.0.0.1"], False),
        ("[fd00::1]:8000", ["[fd00::1]:8000"], True),
        ("[fd00::1]:8000", ["fd00::1"], True),
        ("[fd00::1]:8000", ["[fd00::2]:8000"], False),
        ("10.0.0.1:8000", [], False),
    ],
)
def test_in_subset(endpoint: str, subset: list[str], inside: bool) -> None:
    assert pr.in_subset(endpoint, subset) is inside


@pytest.mark.parametrize(
    ("url", "ep"),
    [
        ("http://10.0.0.1:8000", "10.0.0.1:8000"),
        ("http://[fd00::1]:8000", "[fd00::1]:8000"),
        ("http://10.0.0.1", "10.0.0.1:80"),
    ],
)
def test_endpoint_of(url: str, ep: str) -> None:
    assert pr.endpoint_of(url) == ep


def test_served_endpoint() -> None:
    assert pr.served_endpoint({}) is None
    assert pr.served_endpoint({pr.DESTINATION_NAMESPACE: {pr.SERVED_KEY: ""}}) is None
    assert pr.served_endpoint({pr.DESTINATION_NAMESPACE: {pr.SERVED_KEY: "a:1"}}) == "a:1"


@given(hs.lists(hs.integers(0, 50), min_size=1, max_size=12), hs.integers(0, 12))
def test_retract_takes_back_only_the_blocks_a_pick_added(prompt: list[int], held_before: int) -> None:
    """`PrefixIndex.retract` (strategies.py), as `Router.served_pick` uses it: the blocks the
    primary held before the pick stay; the ones the pick added go; other backends are untouched."""
    from toposerve.router.strategies import PrefixIndex

    hashes = list(dict.fromkeys(prompt))  # chained block hashes never repeat within one prompt
    held_before = min(held_before, len(hashes))
    idx = PrefixIndex()
    idx.insert(hashes, "other", 1.0)
    idx.insert(hashes[:held_before], "a", 1.0)
    matched = idx.match(hashes, ["a"])["a"]
    idx.insert(hashes, "a", 2.0)  # the pick's commit
    idx.retract(hashes[matched:], "a")  # served elsewhere
    assert idx.match(hashes, ["a", "other"]) == {"a": held_before, "other": len(hashes)}
    assert idx.held("a") == held_before


def test_the_response_status_and_the_end_of_its_body_are_kept_for_the_usage() -> None:
    """The picker settles tokens from the response (the usage block is at its end): the
    `:status` and the last RESPONSE_TAIL bytes of a routed request's response are kept."""
    ex = pr.Exchange()
    ex.request_headers([(":path", "/v1/completions")], False, {})
    r = ex.request_body(b'{"model": "m"}', True)
    assert r.pick is not None and r.pick.size == len(b'{"model": "m"}')
    ex.decided(pr.Routed(("10.0.0.1:8000",)))
    ex.response_headers(False, {}, 200)
    ex.response_body(b"x" * (pr.RESPONSE_TAIL + 10), False)
    ex.response_body(b'{"usage": {"prompt_tokens": 3}}', True)
    seen = ex.response()
    assert seen.status == 200 and len(seen.tail) == pr.RESPONSE_TAIL
    assert seen.tail.endswith(b'{"usage": {"prompt_tokens": 3}}')
