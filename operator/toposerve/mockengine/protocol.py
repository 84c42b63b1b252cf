"""OpenAI wire format: request parsing, response bodies and SSE chunks (pure, no I/O).

Clients (the openai SDK, load generators, our router) parse these bytes, so the shapes follow
OpenAI's exactly: compact JSON, one ``data: {...}\\n\\n`` event per token, a final chunk with
an empty delta and the finish_reason, an optional usage chunk with ``choices: []`` (and
``"usage":null`` on every other chunk, as OpenAI sends when ``include_usage`` is set), then
``data: [DONE]``. Errors use the ``{"error": {...}}`` envelope with vLLM's type names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DONE = b"data: [DONE]\n\n"


def dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def sanitize_message(message: str) -> str:
    """vLLM 0.33.0's error-message scrubbing (entrypoints/serve/exception_handling/utils.py
    sanitize_message), applied to every ErrorResponse it builds: object addresses, traceback
    lines and file-system paths go. So an adapter under /tmp/x is reported as ``<path>``."""
    message = re.sub(r" at 0x[0-9a-fA-F]+>", ">", message)
    message = re.sub(r'\n?\s*File "[^"]+", line \d+, in \S+(\n\s+.*)?', "", message)
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    message = re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message)
    return message.strip()


class APIError(Exception):
    """An OpenAI-shaped error with its HTTP status."""

    TYPES = {
        400: "BadRequestError",
        401: "AuthenticationError",
        404: "NotFoundError",
        413: "BadRequestError",
        429: "RateLimitError",
        500: "InternalServerError",
        503: "ServiceUnavailableError",
    }

    def __init__(self, status: int, message: str, param: str | None = None, err_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.err_type = err_type or self.TYPES.get(status, "APIError")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.param,
                "code": self.status,
            }
        }


@dataclass(frozen=True)
class GenerationParams:
    """The fields of a (chat) completion request the mock acts on; the rest are accepted and ignored."""

    model: str | None
    stream: bool
    include_usage: bool
    max_tokens: int | None
    seed: int | None
    prompt_text: str | None  # completions with a string prompt, or a rendered chat
    prompt_ids: list[int] | None  # completions with a token-id prompt
    cache_salt: str | None = None  # salts the prefix cache's first block (isolates tenants)


def _opt_int(body: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise APIError(400, f"{name} must be an integer", param=name)
        if name != "seed" and v < 1:
            raise APIError(400, f"{name} must be at least 1, got {v}", param=name)
        return v
    return None


def _common(body: Mapping[str, Any]) -> tuple[str | None, bool, bool, int | None, int | None]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be a boolean", param="stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, Mapping):
            raise APIError(400, "stream_options must be an object", param="stream_options")
        include_usage = bool(opts.get("include_usage", False))
    n = body.get("n", 1)
    if n not in (1, None):
        raise APIError(400, "the mock engine supports only n=1", param="n")
    return (
        model,
        stream,
        include_usage,
        _opt_int(body, "max_completion_tokens", "max_tokens"),
        _opt_int(body, "seed"),
    )


def _cache_salt(body: Mapping[str, Any]) -> str | None:
    """vLLM 0.33.0's request models check it the same way (entrypoints/openai protocol,
    ``check_cache_salt_support``), 400 naming the parameter."""
    salt = body.get("cache_salt")
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt:
        raise APIError(400, "Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")
    return salt


def parse_completion(body: object) -> GenerationParams:
    if not isinstance(body, Mapping):
        raise APIError(400, "request body must be a JSON object")
    model, stream, usage, max_tokens, seed = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return GenerationParams(model, stream, usage, max_tokens, seed, prompt, None, _cache_salt(body))
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return GenerationParams(model, stream, usage, max_tokens, seed, None, list(prompt), _cache_salt(body))
    if prompt is None:
        raise APIError(400, "prompt is required", param="prompt")
    raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")


def _check_content(i: int, content: object) -> None:
    """A message's content as vLLM's pydantic request model types it: a string, a list of parts
    (a text part's `text` a string), or absent/null. vLLM answers anything else 400; serving it
    would let a client test against the mock what the real engine refuses."""
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        kind = type(content).__name__
        raise APIError(
            400, f"messages[{i}].content must be a string or a list of parts, not {kind}", "messages"
        )
    for j, part in enumerate(content):
        if (
            isinstance(part, Mapping)
            and part.get("type", "text") == "text"
            and not isinstance(part.get("text"), str)
        ):
            kind = type(part.get("text")).__name__
            raise APIError(
                400, f"messages[{i}].content[{j}].text must be a string, not {kind}", param="messages"
            )


def parse_chat(body: object, render: Any) -> GenerationParams:
    if not isinstance(body, Mapping):
        raise APIError(400, "request body must be a JSON object")
    model, stream, usage, max_tokens, seed = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise APIError(400, "each message must be an object with a string role", param="messages")
        _check_content(i, m.get("content"))
    return GenerationParams(model, stream, usage, max_tokens, seed, render(messages), None, _cache_salt(body))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class ChunkFormatter:
    """Builds the SSE events of one streamed response; the per-token path is string concatenation."""

    def __init__(self, chat: bool, req_id: str, created: int, model: str, include_usage: bool) -> None:
        self.chat = chat
        self.include_usage = include_usage
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._head = (
            f'data: {{"id":{dumps(req_id)},"object":"{obj}","created":{created},"model":{dumps(model)},'
        )
        self._tail = ',"usage":null}\n\n' if include_usage else "}\n\n"

    def _choice(self, payload: str, finish_reason: str | None) -> str:
        fr = "null" if finish_reason is None else dumps(finish_reason)
        choice = f'{{"index":0,{payload},"logprobs":null,"finish_reason":{fr}}}'
        return f'{self._head}"choices":[{choice}]{self._tail}'

    def role(self) -> bytes:
        """Chat only: the opening chunk that carries the assistant role."""
        return self._choice('"delta":{"role":"assistant","content":""}', None).encode()

    def token(self, piece: str) -> str:
        if self.chat:
            return self._choice(f'"delta":{{"content":{dumps(piece)}}}', None)
        return self._choice(f'"text":{dumps(piece)}', None)

    def finish(self, reason: str) -> bytes:
        return self._choice('"delta":{}' if self.chat else '"text":""', reason).encode()

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> bytes:
        u = dumps(usage(prompt_tokens, completion_tokens, cached_tokens))
        return f'{self._head}"choices":[],"usage":{u}}}\n\n'.encode()


def completion_body(
    chat: bool, req_id: str, created: int, model: str, text: str, finish_reason: str, u: dict[str, Any]
) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": req_id, "object": obj, "created": created, "model": model, "choices": [choice], "usage": u}
