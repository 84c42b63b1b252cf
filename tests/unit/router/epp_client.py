"""The gateway's side of ext_proc, played from the real generated Envoy protos (xds-protos), as
GIE's own handler tests drive a picker (sigs.k8s.io/gateway-api-inference-extension v1.6.2,
pkg/lwepp/handlers/server_test.go): Envoy in FULL_DUPLEX_STREAMED mode sends the request
headers (with `metadata_context.filter_metadata`), the body in chunks, then the response
headers (with `envoy.lb` / `x-gateway-destination-endpoint-served`) and the response body.
Used against toposerve's picker (tests/unit/router/test_epp_service.py) and side by side with
GIE's reference picker (tests/cluster/test_epp_lwepp.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEST = "x-gateway-destination-endpoint"


def chat(model: str = "m", text: str = "hello", **extra: Any) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": text}], **extra}).encode()


def _md(namespaces: dict[str, dict[str, Any]]) -> base_pb2.Metadata:
    m = base_pb2.Metadata()
    for ns, fields in namespaces.items():
        s = struct_pb2.Struct()
        s.update(fields)
        m.filter_metadata[ns].CopyFrom(s)
    return m


def request_headers(
    path: str = "/v1/chat/completions",
    end_of_stream: bool = False,
    subset: Any = None,
    headers: dict[str, str] | None = None,
) -> pb.ProcessingRequest:
    hs = {
        ":method": "POST" if not end_of_stream else "GET",
        ":path": path,
        ":authority": "gw",
        **(headers or {}),
    }
    msg = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hs.items()]
            ),
            end_of_stream=end_of_stream,
        )
    )
    if subset is not None:
        msg.metadata_context.CopyFrom(
            _md({"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": subset}})
        )
    return msg


def request_body(data: bytes, end_of_stream: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=end_of_stream))


def response_headers(served: str | None, end_of_stream: bool = False) -> pb.ProcessingRequest:
    msg = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":status", raw_value=b"200")]),
            end_of_stream=end_of_stream,
        )
    )
    if served is not None:
        msg.metadata_context.CopyFrom(_md({"envoy.lb": {"x-gateway-destination-endpoint-served": served}}))
    return msg


def response_body(data: bytes, end_of_stream: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=end_of_stream))


@dataclass
class Answer:
    """What the picker answered one request with, read off the real messages."""

    kind: str  # "route", "immediate" or "error" (a gRPC status instead of an answer)
    header: str | None = None  # x-gateway-destination-endpoint
    metadata: str | None = None  # dynamic_metadata envoy.lb / x-gateway-destination-endpoint
    status: int = 0  # ImmediateResponse status
    body: bytes = b""  # echoed request body, or the ImmediateResponse body
    eos: bool = False  # the echoed body's last piece had end_of_stream
    headers: dict[str, str] = field(default_factory=dict)
    messages: list[pb.ProcessingResponse] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return (self.header or "").split(",")


def read_answer(messages: list[pb.ProcessingResponse]) -> Answer:
    a = Answer("none", messages=messages)
    for m in messages:
        kind = m.WhichOneof("response")
        if kind == "immediate_response":
            ir = m.immediate_response
            a.kind, a.status, a.body = "immediate", ir.status.code, bytes(ir.body)
            a.headers = {h.header.key.lower(): h.header.raw_value.decode() for h in ir.headers.set_headers}
        elif kind == "request_headers":
            a.kind = "route"
            for h in m.request_headers.response.header_mutation.set_headers:
                if h.header.key == DEST:
                    a.header = h.header.raw_value.decode() or h.header.value
            md = json_format.MessageToDict(m.dynamic_metadata) if m.HasField("dynamic_metadata") else {}
            a.metadata = md.get("envoy.lb", {}).get(DEST)
        elif kind == "request_body":
            sr = m.request_body.response.body_mutation.streamed_response
            a.body += sr.body
            a.eos = sr.end_of_stream
    return a


class Stream:
    """One ext_proc stream (one HTTP request), written and read message by message."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = pb_grpc.ExternalProcessorStub(channel).Process()

    async def send(self, *msgs: pb.ProcessingRequest) -> None:
        for m in msgs:
            await self.call.write(m)

    async def read(self, n: int) -> list[pb.ProcessingResponse]:
        out = []
        for _ in range(n):
            m = await self.call.read()
            if m is grpc.aio.EOF:
                break
            out.append(m)
        return out

    async def request(
        self, body: bytes | None, chunks: int = 1, subset: Any = None, headers: dict[str, str] | None = None
    ) -> Answer:
        """Send a request (headers, then the body in `chunks` pieces; None: bodiless) and read the
        picker's answer: a route (headers answer + every body answer) or an ImmediateResponse."""
        try:
            await self.send(request_headers(end_of_stream=body is None, subset=subset, headers=headers))
            if body is not None:
                step = max(1, -(-len(body) // chunks))
                pieces = [body[i : i + step] for i in range(0, len(body), step)] or [b""]
                for i, p in enumerate(pieces):
                    await self.send(request_body(p, i == len(pieces) - 1))
            first = await self.read(1)
            if not first:
                return Answer("none")
            msgs = list(first)
            if first[0].WhichOneof("response") == "request_headers" and body is not None:
                while True:  # the echoed body, up to its end_of_stream
                    more = await self.read(1)
                    msgs += more
                    if (
                        not more
                        or more[0].request_body.response.body_mutation.streamed_response.end_of_stream
                    ):
                        break
            return read_answer(msgs)
        except grpc.aio.AioRpcError as e:
            return Answer("error", body=str(e.code()).encode())

    async def respond(
        self, served: str | None, body: bytes = b"data: [DONE]\n\n"
    ) -> list[pb.ProcessingResponse]:
        """The response path: headers (with the served endpoint), then the body to its end."""
        await self.send(response_headers(served), response_body(body, True))
        return await self.read(2)

    async def close(self) -> None:
        await self.call.done_writing()

    def cancel(self) -> None:
        self.call.cancel()


async def health(channel: grpc.aio.Channel, service: str) -> str:
    """A grpc.health.v1 Check: SERVING, NOT_SERVING, or the gRPC code (NOT_FOUND: unknown name)."""
    try:
        r = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    except grpc.aio.AioRpcError as e:
        return str(e.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
