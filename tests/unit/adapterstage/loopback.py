"""Real servers on loopback for the stager's fetchers: plain HTTP file serving, a Hugging Face Hub
stand-in, and archives to serve. Shared by the stager's and the router's staging tests (and the
cluster test, which serves the same archives to pods)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import ssl
import subprocess
import tarfile
import threading
import zipfile
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

CONFIG = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def adapter_files(rank: int = 8) -> dict[str, bytes]:
    """A PEFT LoRA adapter as vLLM (and the mock engine) reads it."""
    return {
        "adapter_config.json": json.dumps({**CONFIG, "r": rank}).encode(),
        "adapter_model.safetensors": b"\0" * 64,
    }


def tar_bytes(files: Mapping[str, bytes], mode: str = "w:gz", prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tar_with(members: list[tarfile.TarInfo], mode: str = "w:gz") -> bytes:
    """A tar of raw members (links, absolute names, '..'): what a hostile archive holds."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:  # type: ignore[call-overload]
        for info in members:
            t.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buf.getvalue()


def zip_bytes(files: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def self_signed(dirpath: Path, host: str) -> tuple[Path, Path]:
    """(certificate, key) of a self-signed server certificate for `host` (an IP), by openssl."""
    cert, key = dirpath / "cert.pem", dirpath / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={host}",
         "-addext", f"subjectAltName=IP:{host}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@contextlib.contextmanager
def serve(
    handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1", tls: tuple[Path, Path] | None = None
) -> Iterator[str]:
    srv = _Server((host, 0), handler)
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls[0]), str(tls[1]))
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"{'https' if tls else 'http'}://{host}:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@contextlib.contextmanager
def file_server(
    files: Mapping[str, bytes], host: str = "127.0.0.1", tls: tuple[Path, Path] | None = None
) -> Iterator[tuple[str, list[str]]]:
    """GET /<path> answers files[path] (404 otherwise); yields (base URL, the paths requested)."""
    hits: list[str] = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = urlsplit(self.path).path.lstrip("/")
            hits.append(path)
            data = files.get(path)
            if data is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serve(H, host, tls) as url:
        yield url, hits


@contextlib.contextmanager
def fake_hub(
    repos: Mapping[str, Mapping[str, Mapping[str, bytes]]], host: str = "127.0.0.1"
) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """The Hub endpoints huggingface_hub 2.5.0's snapshot_download calls, from its sources
    (.venv site-packages/huggingface_hub):

    - hf_api.py HfApi.model_info (via repo_info): ``GET /api/models/{repo}/revision/{quote(rev)}``,
      a ModelInfo JSON of which it needs ``id`` and ``sha`` (_snapshot_download.py asserts sha);
    - hf_api.py _iter_repo_tree_pages: ``GET /api/models/{repo}/tree/{commit}?recursive=True
      &expand=False``, a JSON list of ``{"type": "file", "path", "size", "oid"}`` (RepoFile's
      kwargs), paginated by a ``Link`` header (one page here);
    - file_download.py get_hf_file_metadata: ``HEAD /{repo}/resolve/{commit}/{file}`` with
      ``X-Repo-Commit``, ``ETag`` and ``Content-Length``; then the ``GET`` of the same URL;
    - utils/_http.py hf_raise_for_status: errors by the ``X-Error-Code`` header
      (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).

    repos: repo id -> revision (branch or tag) -> files. Each revision's commit is the sha1 of
    its name. Yields (endpoint, requests seen with their Authorization header)."""
    commits = {
        hashlib.sha1(f"{repo}@{rev}".encode()).hexdigest(): (repo, rev)
        for repo, revs in repos.items()
        for rev in revs
    }
    seen: list[dict[str, str]] = []

    class H(BaseHTTPRequestHandler):
        def _err(self, status: int, code: str) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            self.send_header("Content-Type", "application/json")
            body = json.dumps({"error": code}).encode()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, doc: Any) -> None:
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _files(self, repo: str, rev: str) -> tuple[str, Mapping[str, bytes]] | None:
            if rev in commits and commits[rev][0] == repo:
                return rev, repos[repo][commits[rev][1]]
            if rev in repos.get(repo, {}):
                return hashlib.sha1(f"{repo}@{rev}".encode()).hexdigest(), repos[repo][rev]
            return None

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            seen.append(
                {"method": self.command, "path": path, "authorization": self.headers.get("Authorization", "")}
            )
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                repo, rev = "/".join(parts[2:4]), "/".join(parts[5:])
                if repo not in repos:
                    return self._err(401, "RepoNotFound")
                got = self._files(repo, rev)
                if got is None:
                    return self._err(404, "RevisionNotFound")
                sha, files = got
                if parts[4] == "revision":
                    return self._json({"id": repo, "sha": sha, "siblings": [{"rfilename": f} for f in files]})
                return self._json(
                    [
                        {"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for f, d in files.items()
                    ]
                )
            if len(parts) >= 5 and parts[2] == "resolve":
                repo, rev, fname = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                got = self._files(repo, rev) if repo in repos else None
                if got is None:
                    return self._err(404, "RevisionNotFound" if repo in repos else "RepoNotFound")
                sha, files = got
                if fname not in files:
                    return self._err(404, "EntryNotFound")
                data = files[fname]
                self.send_response(200)
                self.send_header("X-Repo-Commit", sha)
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)
                return None
            return self._err(404, "EntryNotFound")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serve(H, host) as url:
        yield url, seen
