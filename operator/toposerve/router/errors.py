"""The error envelope every response the router itself makes uses (pure, no I/O).

Clients of an OpenAI-compatible server parse `{"error": {...}}`; a plain-text 500 or an HTML
page from the HTTP library breaks them in confusing ways. vLLM's server writes the same shape,
so a client cannot tell (and need not care) whether the router or an engine answered.
"""

from __future__ import annotations

import json
from typing import Any

# `type` names as vLLM's OpenAI server writes them.
ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    417: "ExpectationFailedError",
    429: "RateLimitError",
    431: "BadRequestError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}
_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI / vLLM error envelope."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "APIError"),
            "param": param,
            "code": status,
        }
    }


def raw_error_response(status: int, message: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection, for the cases where the
    HTTP library has no request to answer (connection refused at the cap, headers timed out)."""
    body = json.dumps(error_body(status, message)).encode()
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body
