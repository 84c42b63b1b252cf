"""The Endpoint Picker Protocol as a pure state machine: ext_proc events in, answers out.

The protocol is GIE's `docs/proposals/004-endpoint-picker-protocol` (sigs.k8s.io/gateway-api-
inference-extension v1.6.2); the message flow follows that module's reference picker,
`pkg/lwepp/handlers/server.go`: in Envoy's FULL_DUPLEX_STREAMED mode the request headers'
answer (which carries the pick) is deferred until the whole body has arrived, the body chunks
received meanwhile are held back and echoed after it (Envoy marks a body answer that comes
before the headers answer spurious and tears the stream down), and each body is echoed as
streamed body mutations of at most 62,000 bytes (`pkg/common/envoy/chunking.go`).

No gRPC, no protobuf, no router here: the shell (service.py) turns protos into these events,
asks the picker when `Reaction.pick` says so, and turns `Out` values back into protos.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

# Names fixed by the protocol (pkg/lwepp/metadata/consts.go, v1.6.2).
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
DESTINATION_NAMESPACE = "envoy.lb"
DESTINATION_KEY = "x-gateway-destination-endpoint"
SERVED_KEY = "x-gateway-destination-endpoint-served"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# gRPC health service names: the proposal's three, plus the reference picker's own name for its
# health port (pkg/lwepp/server/runserver.go) and "" (the server as a whole, grpc-health-probe's
# default), so probes written for either answer the same.
LIVENESS = "liveness"
READINESS = "readiness"
LWEPP_HEALTH = "inference-extension"
BODY_CHUNK = 62_000  # pkg/common/envoy/chunking.go BodyByteLimit
RESPONSE_TAIL = 8192  # response bytes kept for the usage block

REQUEST = "request"
RESPONSE = "response"


# ------------------------------------------------------------------------------------------ values


@dataclass(frozen=True)
class PickInput:
    """What the picker gets: the request's path and headers (lower-cased names), its JSON body
    (an empty one for a bodiless request) and the subset it must pick from (None: any)."""

    path: str
    headers: Mapping[str, str]
    body: dict[str, Any]
    subset: frozenset[str] | None
    size: int = 0  # the body's bytes (what a flow-control queue holds)


@dataclass(frozen=True)
class ResponseSeen:
    """What the picker saw of the response: its `:status` (None: no response headers came) and
    the last RESPONSE_TAIL bytes of its body, where the engine's `usage` block is (the end of a
    JSON answer, or a stream's last events with `stream_options.include_usage`)."""

    status: int | None
    tail: bytes


@dataclass(frozen=True)
class Routed:
    """The picker's answer: endpoints as `ip:port`, primary first, then fallbacks in order."""

    endpoints: tuple[str, ...]


@dataclass(frozen=True)
class Refused:
    """The picker's refusal: answered to the client by Envoy as it is (ImmediateResponse)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


Outcome = Routed | Refused


@dataclass(frozen=True)
class RouteAnswer:
    """The request headers' answer: `value` goes both in the `x-gateway-destination-endpoint`
    header and in the `envoy.lb` dynamic metadata (the protocol: never two different values)."""

    value: str


@dataclass(frozen=True)
class BodyAnswer:
    phase: str  # REQUEST or RESPONSE
    data: bytes
    end_of_stream: bool


@dataclass(frozen=True)
class HeadersPassed:
    """A response headers (or bodiless request headers past the pick) answer with no change."""

    phase: str


@dataclass(frozen=True)
class TrailersPassed:
    phase: str


@dataclass(frozen=True)
class Immediate:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


Out = RouteAnswer | BodyAnswer | HeadersPassed | TrailersPassed | Immediate


@dataclass(frozen=True)
class Reaction:
    """What one event leads to: messages to send (in order); `pick`: ask the picker, then call
    `Exchange.decided`; `served`: the endpoint Envoy says served the request; `done`: the
    request is over (release its load)."""

    out: tuple[Out, ...] = ()
    pick: PickInput | None = None
    served: str | None = None
    done: bool = False


# ------------------------------------------------------------------------------------------ helpers


def endpoint_of(url: str) -> str:
    """A backend URL's `ip:port` as the protocol writes it (IPv6 in brackets, Go's JoinHostPort)."""
    u = urlsplit(url)
    host = u.hostname or ""
    port = u.port or (443 if u.scheme == "https" else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_host(ep: str) -> tuple[str, str | None]:
    """(host, port) of `ip:port`, `[v6]:port`, a bare IPv4 or a bare IPv6 address (port None)."""
    ep = ep.strip()
    if ep.startswith("["):
        host, _, rest = ep[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") and rest[1:] else None
    if ep.count(":") == 1:
        host, port = ep.split(":")
        return host, port or None
    return ep, None  # a bare IPv4, or a bare IPv6 address


def parse_subset(filter_metadata: Mapping[str, Any]) -> frozenset[str] | None:
    """The subset the data plane restricts the pick to, or None when it sets none.

    As the reference picker reads it (pkg/lwepp/handlers/request.go): the value may be a list of
    strings or one comma-separated string (Envoy's header-to-metadata filters write the latter),
    and each string may itself hold several comma-separated endpoints. A present key with no
    usable entry is an empty subset: nothing is eligible (503), never a fall-back to all."""
    ns = filter_metadata.get(SUBSET_NAMESPACE)
    if not isinstance(ns, Mapping) or SUBSET_KEY not in ns:
        return None
    raw = ns[SUBSET_KEY]
    items = (
        [raw]
        if isinstance(raw, str)
        else [x for x in raw if isinstance(x, str)]
        if isinstance(raw, list)
        else []
    )
    return frozenset(e.strip() for s in items for e in s.split(",") if e.strip())


def in_subset(endpoint: str, subset: Iterable[str]) -> bool:
    """Whether `endpoint` (`ip:port`) is named by the subset: as `ip:port`, or as a bare IP
    (every port of that address, as the reference picker allows)."""
    host, port = _split_host(endpoint)
    for s in subset:
        h, p = _split_host(s)
        if h == host and (p is None or p == port):
            return True
    return False


def served_endpoint(filter_metadata: Mapping[str, Any]) -> str | None:
    """`envoy.lb` / `x-gateway-destination-endpoint-served` from the response's metadata."""
    ns = filter_metadata.get(DESTINATION_NAMESPACE)
    v = ns.get(SERVED_KEY) if isinstance(ns, Mapping) else None
    return v.strip() if isinstance(v, str) and v.strip() else None


def chunks(phase: str, data: bytes, end_of_stream: bool) -> list[BodyAnswer]:
    """`data` echoed as streamed body mutations of at most BODY_CHUNK bytes, the last one
    carrying `end_of_stream` (one empty answer for no bytes, as chunking.go does)."""
    if not data:
        return [BodyAnswer(phase, b"", end_of_stream)]
    out = []
    for i in range(0, len(data), BODY_CHUNK):
        part = data[i : i + BODY_CHUNK]
        out.append(BodyAnswer(phase, part, end_of_stream and i + BODY_CHUNK >= len(data)))
    return out


def error_json(status: int, message: str, kind: str) -> bytes:
    """vLLM's OpenAI error envelope (the router's own errors have the same shape, errors.py)."""
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


# ------------------------------------------------------------------------------------------ the machine


@dataclass
class Exchange:
    """One ext_proc stream: one HTTP request and its response, as Envoy reports them.

    `max_body_bytes`: a larger request body is refused with 413 before any pick."""

    max_body_bytes: int = 64 * 1024 * 1024
    headers: dict[str, str] = field(default_factory=dict)
    subset: frozenset[str] | None = None
    body: bytearray = field(default_factory=bytearray)
    pending: bytearray = field(default_factory=bytearray)  # body bytes not echoed yet
    headers_seen: bool = False
    had_body: bool = False  # a body message came (Envoy then awaits a body answer, even empty)
    awaiting_pick: bool = False
    answered: bool = False  # the request headers' answer (the pick) was sent
    body_ended: bool = False  # the request body's end arrived (or there was none)
    routed: bool = False  # a pick holds load until `done`
    refused: bool = False
    finished: bool = False
    response_status: int | None = None
    response_tail: bytearray = field(default_factory=bytearray)

    # -------------------------------------------------------------- request path

    def request_headers(
        self, headers: Sequence[tuple[str, str]], end_of_stream: bool, metadata: Mapping[str, Any]
    ) -> Reaction:
        if self.headers_seen:
            raise ProtocolError("request headers twice on one stream")
        self.headers_seen = True
        for k, v in headers:
            self.headers.setdefault(k.lower(), v)  # the first of a repeated name, as a proxy reads it
        self.subset = parse_subset(metadata)
        if end_of_stream:  # no body (GET, or a bodiless POST): pick now
            self.body_ended = True
            return self._ask()
        return Reaction()

    def request_body(self, data: bytes, end_of_stream: bool) -> Reaction:
        if not self.headers_seen:
            raise ProtocolError("request body before request headers")
        if self.refused:
            return Reaction()
        if self.body_ended:
            raise ProtocolError("request body after its end")
        if len(self.body) + len(data) > self.max_body_bytes:
            self.refused = True
            msg = f"request body larger than {self.max_body_bytes} bytes"
            return Reaction((Immediate(413, error_json(413, msg, "BadRequestError")),))
        self.had_body = True
        self.body += data
        self.pending += data
        if not end_of_stream:
            if not self.answered:  # held back until the headers answer has gone (see module doc)
                return Reaction()
            return Reaction(tuple(self._flush(False)))
        self.body_ended = True
        return self._ask()

    def _ask(self) -> Reaction:
        if not self.body:
            body: dict[str, Any] = {}
        else:
            try:
                doc = json.loads(bytes(self.body))
                if not isinstance(doc, dict):
                    raise ValueError("body must be a JSON object")
            except (ValueError, RecursionError) as e:
                self.refused = True
                msg = "JSON nested too deeply" if isinstance(e, RecursionError) else str(e)
                return Reaction(
                    (Immediate(400, error_json(400, f"invalid JSON body: {msg}", "BadRequestError")),)
                )
            body = doc
        self.awaiting_pick = True
        path = self.headers.get(":path", "").split("?", 1)[0]
        return Reaction(pick=PickInput(path, dict(self.headers), body, self.subset, len(self.body)))

    def decided(self, outcome: Outcome) -> Reaction:
        """The picker's answer to `Reaction.pick`: the headers answer and the held-back body, or
        the ImmediateResponse that ends the request."""
        if not self.awaiting_pick:
            raise ProtocolError("no pick was asked for")
        self.awaiting_pick = False
        if isinstance(outcome, Refused):
            self.refused = True
            return Reaction((Immediate(outcome.status, outcome.body, outcome.headers),))
        if not outcome.endpoints:
            raise ProtocolError("a pick with no endpoint")
        self.routed = self.answered = True
        out: list[Out] = [RouteAnswer(",".join(outcome.endpoints))]
        if self.had_body:
            out += self._flush(True)
        return Reaction(tuple(out))

    def _flush(self, end_of_stream: bool) -> list[BodyAnswer]:
        data, self.pending = bytes(self.pending), bytearray()
        return chunks(REQUEST, data, end_of_stream)

    # -------------------------------------------------------------- response path

    def response_headers(
        self, end_of_stream: bool, metadata: Mapping[str, Any], status: int | None = None
    ) -> Reaction:
        self.response_status = status
        served = served_endpoint(metadata)
        return Reaction((HeadersPassed(RESPONSE),), served=served, done=self._end(end_of_stream))

    def response_body(self, data: bytes, end_of_stream: bool) -> Reaction:
        if self.routed:
            self.response_tail += data[-RESPONSE_TAIL:]
            del self.response_tail[:-RESPONSE_TAIL]
        return Reaction(tuple(chunks(RESPONSE, data, end_of_stream)), done=self._end(end_of_stream))

    def trailers(self, phase: str) -> Reaction:
        return Reaction((TrailersPassed(phase),), done=self._end(phase == RESPONSE))

    def broken(self) -> Reaction:
        """The stream ended or broke (Envoy gone, client gone): release what was held."""
        return Reaction(done=self._end(True))

    def response(self) -> ResponseSeen:
        return ResponseSeen(self.response_status, bytes(self.response_tail))

    def _end(self, end: bool) -> bool:
        """True exactly once, when a routed request's response ends."""
        if end and self.routed and not self.finished:
            self.finished = True
            return True
        return False


class ProtocolError(ValueError):
    """Envoy sent messages out of the protocol's order: the stream is answered with an error."""
