"""The ext_proc gRPC shell: protos in, `protocol.Exchange` decides, protos out.

Streams are Envoy's `envoy.service.ext_proc.v3.ExternalProcessor/Process` in full-duplex
streaming mode, with the real generated messages (PyPI `xds-protos`, grpc's build of
envoyproxy/data-plane-api). One `Exchange` per stream; the picker is asked once per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram

from toposerve.router.epp import protocol as pr

log = logging.getLogger("toposerve.router.epp")

# decision latency: a pick is sub-millisecond unless it holds or queues (then seconds)
_DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1, 5, 30)


class Picker(Protocol):
    def ready(self) -> bool: ...
    async def pick(self, inp: pr.PickInput) -> tuple[pr.Routed | pr.Refused, Any]: ...
    def served(self, held: Any, endpoint: str) -> None: ...
    def finish(self, held: Any, response: pr.ResponseSeen | None = None) -> None: ...


class EppMetrics:
    """`toposerve_router_epp_decisions_total{outcome}` (routed, or the refusal's status code)
    and `toposerve_router_epp_decision_seconds` (from the request's end, as the picker got
    it, to its answer), on the router's (or the gateway's) registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "toposerve_router_epp_decisions",
            "Endpoint Picker (ext_proc) decisions by outcome: routed, or the status answered.",
            ["outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "toposerve_router_epp_decision_seconds",
            "Endpoint Picker decision latency (holds and queueing included).",
            buckets=_DECISION_BUCKETS,
            registry=registry,
        )
        self.streams = Counter(
            "toposerve_router_epp_streams", "ext_proc streams, by how they ended.", ["end"], registry=registry
        )


def _header_value(h: base_pb2.HeaderValue) -> str:
    """As GIE's `envoy.GetHeaderValue` (pkg/common/envoy/headers.go): raw_value when set."""
    return h.raw_value.decode("utf-8", "replace") if h.raw_value else str(h.value)


def _metadata(msg: pb.ProcessingRequest) -> dict[str, Any]:
    """`metadata_context.filter_metadata` as plain data (namespace -> JSON object)."""
    if not msg.HasField("metadata_context"):
        return {}
    return {k: json_format.MessageToDict(v) for k, v in msg.metadata_context.filter_metadata.items()}


def _set_headers(pairs: Mapping[str, str] | tuple[tuple[str, str], ...]) -> pb.HeaderMutation:
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    return pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()))
            for k, v in items
        ]
    )


def to_proto(out: pr.Out) -> pb.ProcessingResponse:
    """One answer of the core as the ext_proc message Envoy expects."""
    if isinstance(out, pr.RouteAnswer):
        meta = struct_pb2.Struct()
        meta.update({pr.DESTINATION_NAMESPACE: {pr.DESTINATION_KEY: out.value}})
        common = pb.CommonResponse(
            clear_route_cache=True, header_mutation=_set_headers({pr.DESTINATION_KEY: out.value})
        )
        return pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(response=common), dynamic_metadata=meta
        )
    if isinstance(out, pr.BodyAnswer):
        streamed = pb.StreamedBodyResponse(body=out.data, end_of_stream=out.end_of_stream)
        body = pb.BodyResponse(
            response=pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=streamed))
        )
        if out.phase == pr.REQUEST:
            return pb.ProcessingResponse(request_body=body)
        return pb.ProcessingResponse(response_body=body)
    if isinstance(out, pr.HeadersPassed):
        h = pb.HeadersResponse(response=pb.CommonResponse())
        if out.phase == pr.REQUEST:
            return pb.ProcessingResponse(request_headers=h)
        return pb.ProcessingResponse(response_headers=h)
    if isinstance(out, pr.TrailersPassed):
        if out.phase == pr.REQUEST:
            return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=out.status),
            headers=_set_headers(out.headers),
            body=out.body,
            details=f"toposerve_epp_{out.status}",
        )
    )


class ExtProc(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # generated, untyped
    """`Process`: one stream per HTTP request, decided by `protocol.Exchange`."""

    def __init__(self, picker: Picker, metrics: EppMetrics, max_body_bytes: int) -> None:
        self.picker = picker
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def Process(  # the gRPC method's name
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        ex = pr.Exchange(max_body_bytes=self.max_body_bytes)
        held: Any = None
        end = "broken"
        try:
            async for msg in request_iterator:
                try:
                    r = self._event(ex, msg)
                except pr.ProtocolError as e:
                    end = "protocol_error"
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                    return
                if r.pick is not None:
                    t0 = time.perf_counter()
                    outcome, held = await self.picker.pick(r.pick)
                    self.metrics.latency.observe(time.perf_counter() - t0)
                    label = "routed" if isinstance(outcome, pr.Routed) else str(outcome.status)
                    self.metrics.decisions.labels(label).inc()
                    r = ex.decided(outcome)
                if r.served is not None and held is not None:
                    self.picker.served(held, r.served)
                for out in r.out:
                    yield to_proto(out)
                if r.done and held is not None:
                    self.picker.finish(held, ex.response())
            end = "completed"
        finally:  # the stream ended, broke or was cancelled: never leave load behind
            if ex.broken().done and held is not None:
                self.picker.finish(held, ex.response())
            self.metrics.streams.labels(end).inc()

    @staticmethod
    def _event(ex: pr.Exchange, msg: pb.ProcessingRequest) -> pr.Reaction:
        kind = msg.WhichOneof("request")
        if kind == "request_headers":
            h = msg.request_headers
            headers = [(x.key, _header_value(x)) for x in h.headers.headers]
            return ex.request_headers(headers, h.end_of_stream, _metadata(msg))
        if kind == "request_body":
            return ex.request_body(msg.request_body.body, msg.request_body.end_of_stream)
        if kind == "response_headers":
            h = msg.response_headers
            status = next((_header_value(x) for x in h.headers.headers if x.key == ":status"), "")
            code = int(status) if status.isdigit() else None
            return ex.response_headers(h.end_of_stream, _metadata(msg), code)
        if kind == "response_body":
            return ex.response_body(msg.response_body.body, msg.response_body.end_of_stream)
        if kind == "request_trailers":
            return ex.trailers(pr.REQUEST)
        if kind == "response_trailers":
            return ex.trailers(pr.RESPONSE)
        raise pr.ProtocolError(f"a ProcessingRequest with no known request ({kind})")
