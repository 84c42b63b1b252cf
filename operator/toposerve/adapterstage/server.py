"""The stager's HTTP endpoint, in the engine pod (a native sidecar next to the engine).

- ``POST /stage`` ``{"source": S}`` (S is ``AdapterSpec.engine_source``): 200
  ``{"path": DIR, "source": S, "cached": bool}`` once the adapter's files are in DIR on the
  model cache; otherwise the status of :class:`fetch.StageError` (400 a malformed source, 403 no
  access, 404 no such object/repo/revision, 422 not an adapter or a refused archive, 502/504 the
  network) with an OpenAI-style error body ``{"error": {"message", "type", "code"}}``, the shape
  the router already reads from vLLM, so its message reaches ``status.gateway.adapters[].lastError``.
- ``GET /health``: 200 once serving (the sidecar's startup and readiness probes).

Calls for one source share one download (one task per source; later callers wait for it); at
most ``concurrency`` downloads run at a time, in threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from toposerve.adapterstage import fetch
from toposerve.adapterstage.sources import DEFAULT_LIMITS, Limits

log = logging.getLogger("toposerve.adapterstage")


class Stager:
    def __init__(
        self, root: str | Path, limits: Limits = DEFAULT_LIMITS, concurrency: int = 4, timeout_s: float = 60.0
    ) -> None:
        self.root = Path(root)
        self.limits = limits
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: dict[str, asyncio.Task[tuple[Path, bool]]] = {}

    async def stage(self, source: str) -> tuple[Path, bool]:
        task = self._tasks.get(source)
        if task is None:
            task = self._tasks[source] = asyncio.create_task(self._run(source))
            task.add_done_callback(lambda _t: self._tasks.pop(source, None))
        return await asyncio.shield(task)

    async def _run(self, source: str) -> tuple[Path, bool]:
        async with self._slots:
            log.info("staging %s", source)
            path, cached = await asyncio.to_thread(
                fetch.stage, source, self.root, self.limits, self.timeout_s
            )
            log.info("staged %s at %s%s", source, path, " (was there)" if cached else "")
            return path, cached


def _error(status: int, message: str, code: str = "") -> web.Response:
    kind = "BadRequestError" if status < 500 else "BadGatewayError"
    body = {"error": {"message": message, "type": kind, "param": "source", "code": code or status}}
    return web.json_response(body, status=status)


def make_app(stager: Stager) -> web.Application:
    async def stage(request: web.Request) -> web.Response:
        try:
            doc: Any = json.loads(await request.read())
        except (ValueError, RecursionError):
            return _error(
                400, 'the body must be JSON: {"source": "https://... | s3://... | hf://org/repo@rev"}'
            )
        source = doc.get("source") if isinstance(doc, dict) else None
        if not isinstance(source, str) or not source:
            return _error(400, "source: a non-empty string is required")
        try:
            path, cached = await stager.stage(source)
        except fetch.StageError as e:
            log.warning("staging %s failed: %d %s", source, e.status, e.message)
            return _error(e.status, e.message)
        except Exception as e:  # a bug or the disk: say so, naming the source
            log.exception("staging %s failed", source)
            return _error(500, f"{source}: staging failed: {e!r}"[:1024])
        return web.json_response({"path": str(path), "source": source, "cached": cached})

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 << 10)
    app.router.add_post("/stage", stage)
    app.router.add_get("/health", health)
    return app
