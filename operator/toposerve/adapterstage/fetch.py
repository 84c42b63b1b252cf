"""The downloads behind one staging (blocking: the server runs each in a thread).

``stage(source, root)`` fetches into a fresh temporary directory under ``root`` (the same file
system, so the final ``rename`` is atomic), checks that the result is a PEFT adapter
(``adapter_config.json``), and renames it to ``root/<stage_name(source)>``. A directory that is
there already is the answer (another pod on a shared cache, or an earlier start, staged it):
nothing is downloaded twice, and a half-written download is never visible under the final name.

Every failure is a :class:`StageError` whose message names the source and the cause; its
``status`` says whose fault it is (4xx: the source's, not retried soon by the router; 5xx: the
network's or the server's).

Credentials: S3 through boto3's standard chain (``AWS_*`` variables, a web identity token as
IRSA and EKS Pod Identity inject, the instance profile; ``AWS_ENDPOINT_URL(_S3)`` for S3-compatible
stores); Hugging Face through ``HF_TOKEN`` and ``HF_ENDPOINT``, which huggingface_hub reads itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from toposerve.adapterstage.sources import (
    DEFAULT_LIMITS,
    ArchiveError,
    Limits,
    MemberType,
    Source,
    SourceError,
    adapter_root,
    archive_kind,
    member_path,
    parse_source,
    stage_name,
)

TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


class StageError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def stage(
    source: str, root: str | Path, limits: Limits = DEFAULT_LIMITS, timeout_s: float = 60.0
) -> tuple[Path, bool]:
    """(the staged directory, whether it was there already). Blocking."""
    try:
        src = parse_source(source)
    except SourceError as e:
        raise StageError(400, str(e)) from None
    root = Path(root)
    final = root / stage_name(source)
    if final.is_dir():
        return final, True
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=root))
    try:
        files = tmp / "files"
        files.mkdir()
        try:
            if src.kind == "http":
                _fetch_http(src, files, tmp / "archive", limits, timeout_s)
            elif src.kind == "s3":
                _fetch_s3(src, files, tmp / "archive", limits)
            else:
                _fetch_hf(src, files, limits, timeout_s)
            top = adapter_root(_walk(files))
        except ArchiveError as e:
            raise StageError(422, f"{source}: {e}") from None
        with contextlib.suppress(OSError):  # readable by the engine whatever the stager's umask
            os.chmod(files / top if top else files, 0o755)
        try:
            os.rename(files / top if top else files, final)
        except OSError:
            if not final.is_dir():  # a concurrent stager's rename won the race: that one is as good
                raise
        return final, False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sweep(root: str | Path, older_than_s: float = 6 * 3600) -> None:
    """Remove temporary directories left by a stager that died mid-download (old ones only:
    on a shared cache another pod may be writing a young one)."""
    root = Path(root)
    if not root.is_dir():
        return
    now = time.time()
    for p in root.glob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)


def _walk(top: Path) -> Iterator[str]:
    for dirpath, _, names in os.walk(top):
        rel = os.path.relpath(dirpath, top)
        for n in names:
            yield n if rel == "." else f"{rel}/{n}"


# ------------------------------------------------------------------------------------ http(s)


CA_BUNDLE_ENV = "STAGE_CA_BUNDLE"  # PEM text (spec.lora.stagingSecret): also trusted for https


def tls_context() -> ssl.SSLContext:
    """The system's trust store, plus the PEM certificates in STAGE_CA_BUNDLE when set (an
    in-house artifact server with a private CA)."""
    ctx = ssl.create_default_context()
    pem = os.environ.get(CA_BUNDLE_ENV, "").strip()
    if pem:
        try:
            ctx.load_verify_locations(cadata=pem)
        except (ssl.SSLError, ValueError) as e:
            raise StageError(500, f"{CA_BUNDLE_ENV} holds no usable PEM certificate: {e}") from None
    return ctx


def _fetch_http(src: Source, dest: Path, archive: Path, limits: Limits, timeout_s: float) -> None:
    req = urllib.request.Request(src.url, headers={"User-Agent": "toposerve-adapter-stage"})
    ctx = tls_context() if src.url.startswith("https://") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=ctx) as r, open(archive, "wb") as out:
            _copy(r, out, limits.max_bytes)
    except urllib.error.HTTPError as e:
        raise StageError(
            _upstream_status(e.code), f"{src.raw}: GET answered HTTP {e.code} {e.reason}"
        ) from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise StageError(502, f"{src.raw}: GET failed: {reason}") from None
    _extract(archive, dest, limits)


def _upstream_status(code: int) -> int:
    """The stager's answer for an upstream HTTP status: the source's fault (no such object, no
    access) as 404/403; anything else as a bad gateway (retried)."""
    if code in (401, 403):
        return 403
    if code in (404, 410):
        return 404
    return 502


def _copy(r: IO[bytes], out: IO[bytes], max_bytes: int) -> int:
    n = 0
    while chunk := r.read(_CHUNK):
        n += len(chunk)
        if n > max_bytes:
            raise ArchiveError(f"larger than the limit of {max_bytes} bytes: refused")
        out.write(chunk)
    return n


# ------------------------------------------------------------------------------------ archives


def _extract(archive: Path, dest: Path, limits: Limits) -> None:
    """Unpack `archive` into `dest`, member by member (never extractall): each path checked by
    member_path, the total size and file count bounded; a truncated or corrupt archive is an
    ArchiveError."""
    with open(archive, "rb") as f:
        head = f.read(512)
    kind = archive_kind(head)
    if kind is None:
        raise ArchiveError(
            f"not an archive (want tar, tar.gz/tgz, tar.bz2, tar.xz or zip; the first bytes are {head[:8]!r})"
        )
    budget = _Budget(limits)
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    mode = (info.external_attr >> 16) & 0o170000
                    mkind: MemberType = (
                        "dir"
                        if info.is_dir()
                        else "symlink"
                        if mode == 0o120000
                        else "file"
                        if mode in (0, 0o100000)
                        else "other"
                    )
                    rel = member_path(info.filename, mkind)
                    if rel is not None:
                        budget.add(rel, info.file_size)
                        with z.open(info) as src:
                            _write(dest, rel, src, info.file_size)
        else:
            with tarfile.open(archive, "r:*") as t:
                for m in t:
                    tkind: MemberType = (
                        "dir" if m.isdir() else "file" if m.isfile() else "symlink" if m.issym()
                        else "hardlink" if m.islnk() else "other"
                    )  # fmt: skip
                    rel = member_path(m.name, tkind)
                    if rel is not None:
                        budget.add(rel, m.size)
                        fobj = t.extractfile(m)
                        assert fobj is not None
                        with fobj:
                            _write(dest, rel, fobj, m.size)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        if isinstance(e, OSError) and e.errno:
            raise  # a real I/O error (disk full): not the archive's fault
        raise ArchiveError(f"truncated or corrupt {kind} archive: {e}") from None
    finally:
        with contextlib.suppress(OSError):
            archive.unlink()


class _Budget:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.bytes = 0
        self.files = 0
        self.seen: set[str] = set()

    def add(self, rel: str, size: int) -> None:
        if rel in self.seen:
            raise ArchiveError(f"archive member {rel!r} appears twice: refused")
        self.seen.add(rel)
        self.files += 1
        if self.files > self.limits.max_files:
            raise ArchiveError(f"more than {self.limits.max_files} files: refused")
        self.bytes += size
        if self.bytes > self.limits.max_bytes:
            raise ArchiveError(f"unpacks to more than the limit of {self.limits.max_bytes} bytes: refused")


def _write(dest: Path, rel: str, src: IO[bytes], declared: int) -> None:
    """Copy one member to dest/rel, no more bytes than its header declared (which the budget
    counted): a member holding more is refused, not trusted."""
    path = dest / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "xb") as out:
        while chunk := src.read(_CHUNK):
            n += len(chunk)
            if n > declared:
                raise ArchiveError(
                    f"archive member {rel!r} holds more than its declared {declared} bytes: refused"
                )
            out.write(chunk)
    os.chmod(path, 0o644)


# ------------------------------------------------------------------------------------ s3


def _s3_client() -> Any:
    import boto3  # the standard credential chain; AWS_ENDPOINT_URL(_S3) honoured by boto3 itself

    return boto3.client("s3")


def _fetch_s3(src: Source, dest: Path, archive: Path, limits: Limits) -> None:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        client = _s3_client()
        prefix = src.key.rstrip("/") + "/" if src.key else ""
        budget = _Budget(limits)
        listed = False
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=src.bucket, Prefix=prefix):
            for obj in page.get("Contents") or ():
                rel_name = obj["Key"][len(prefix) :]
                if not rel_name or rel_name.endswith("/"):  # a "folder" marker object
                    continue
                listed = True
                rel = member_path(rel_name, "file")
                assert rel is not None
                budget.add(rel, int(obj.get("Size") or 0))
                path = dest / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                body = client.get_object(Bucket=src.bucket, Key=obj["Key"])["Body"]
                with open(path, "xb") as out:
                    _copy(body, out, limits.max_bytes)
        if listed:
            return
        if not src.key:
            raise StageError(404, f"{src.raw}: the bucket has no objects")
        try:
            body = client.get_object(Bucket=src.bucket, Key=src.key)["Body"]
        except ClientError as e:
            if _s3_code(e) in ("NoSuchKey", "404"):
                raise StageError(
                    404,
                    f"{src.raw}: no object {src.key!r} and no objects under {prefix!r} in bucket {src.bucket}",
                ) from None
            raise
        with open(archive, "wb") as out:
            _copy(body, out, limits.max_bytes)
        _extract(archive, dest, limits)
    except NoCredentialsError:
        raise StageError(
            403, f"{src.raw}: no AWS credentials (AWS_* variables, IRSA or EKS Pod Identity on the pod)"
        ) from None
    except ClientError as e:
        code = _s3_code(e)
        status = 404 if code in ("NoSuchBucket", "NoSuchKey", "404") else 403 if code in (
            "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken") else 502  # fmt: skip
        raise StageError(status, f"{src.raw}: S3 answered {code}: {_s3_message(e)}") from None
    except BotoCoreError as e:
        raise StageError(502, f"{src.raw}: S3 unreachable: {e}") from None


def _s3_code(e: Any) -> str:
    return str((getattr(e, "response", None) or {}).get("Error", {}).get("Code", "?"))


def _s3_message(e: Any) -> str:
    return str((getattr(e, "response", None) or {}).get("Error", {}).get("Message", "")) or str(e)


# ------------------------------------------------------------------------------------ hugging face


def _fetch_hf(src: Source, dest: Path, limits: Limits, timeout_s: float) -> None:
    """snapshot_download at the revision into `dest` (HF_TOKEN, HF_ENDPOINT from the environment,
    read by huggingface_hub itself), after checking the repo's listing against the limits and the
    member rules. Its local-dir bookkeeping (``.cache/``) is removed after."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.hf_api import RepoFile

    where = f"{src.raw}"
    try:
        # the listing first: a repo that is no adapter (a whole model) is refused before a download
        files = [
            f
            for f in HfApi().list_repo_tree(src.repo, revision=src.revision, recursive=True)
            if isinstance(f, RepoFile)
        ]
        budget = _Budget(limits)
        for f in files:
            budget.add(member_path(f.path, "file") or f.path, int(f.size or 0))
        snapshot_download(src.repo, revision=src.revision, local_dir=str(dest), etag_timeout=timeout_s)
    except RevisionNotFoundError:
        raise StageError(404, f"{where}: no revision {src.revision!r} in {src.repo}") from None
    except GatedRepoError:
        raise StageError(
            403, f"{where}: {src.repo} is gated: HF_TOKEN (serving.hfTokenSecret) lacks access"
        ) from None
    except RepositoryNotFoundError:
        raise StageError(
            404, f"{where}: no repo {src.repo} (or it is private and HF_TOKEN lacks access)"
        ) from None
    except LocalEntryNotFoundError as e:  # what it raises when the Hub cannot be reached
        raise StageError(502, f"{where}: the Hugging Face Hub is unreachable: {e}") from None
    except HfHubHTTPError as e:
        code = e.response.status_code if e.response is not None else 502
        raise StageError(_upstream_status(code), f"{where}: the Hub answered {code}: {e}") from None
    shutil.rmtree(dest / ".cache", ignore_errors=True)
