"""The stager's fetchers and endpoint against real servers on loopback: an HTTP server serving
archives (good, hostile, truncated), moto's S3 server driven through real boto3, and a Hugging
Face Hub stand-in that huggingface_hub's own snapshot_download talks to (loopback.fake_hub)."""

from __future__ import annotations

import asyncio
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.unit.adapterstage.loopback import (
    adapter_files,
    fake_hub,
    file_server,
    self_signed,
    tar_bytes,
    tar_with,
    zip_bytes,
)
from toposerve.adapterstage import fetch
from toposerve.adapterstage.server import Stager, make_app
from toposerve.adapterstage.sources import Limits, stage_name


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(v, raising=False)


def _hostile() -> dict[str, bytes]:
    evil = tarfile.TarInfo("../../escaped.txt")
    evil.size = 3
    link = tarfile.TarInfo("adapter_model.safetensors")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    cfg = tarfile.TarInfo("adapter_config.json")
    cfg.size = 2
    good = tar_bytes(adapter_files())
    return {
        "good.tgz": good,
        "nested.tar": tar_bytes(adapter_files(), mode="w", prefix="sql/"),
        "a.zip": zip_bytes(adapter_files()),
        "traversal.tgz": tar_with([evil]),
        "symlink.tgz": tar_with([cfg, link]),
        "truncated.tgz": good[: len(good) // 2],
        "page.html": b"<html>not an archive</html>" + b" " * 300,
        "empty.tgz": tar_bytes({"README.md": b"hi"}),
    }


@pytest.fixture
def files() -> Iterator[tuple[str, list[str]]]:
    with file_server(_hostile()) as s:
        yield s


@pytest.mark.parametrize("name", ["good.tgz", "nested.tar", "a.zip"])
def test_http_archives_stage_to_the_adapter_directory(
    files: tuple[str, list[str]], tmp_path: Path, name: str
) -> None:
    url = f"{files[0]}/{name}"
    path, cached = fetch.stage(url, tmp_path)
    assert path == tmp_path / stage_name(url) and not cached
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 8
    assert (path / "adapter_model.safetensors").stat().st_size == 64
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    again, cached = fetch.stage(url, tmp_path)
    assert again == path and cached and files[1].count(name) == 1  # downloaded once


@pytest.mark.parametrize(
    ("name", "status", "words"),
    [
        ("traversal.tgz", 422, "path traversal"),
        ("symlink.tgz", 422, "link"),
        ("truncated.tgz", 422, "truncated or corrupt"),
        ("page.html", 422, "not an archive"),
        ("empty.tgz", 422, "no adapter_config.json"),
        ("missing.tgz", 404, "HTTP 404"),
    ],
)
def test_bad_http_sources_fail_naming_source_and_cause(
    files: tuple[str, list[str]], tmp_path: Path, name: str, status: int, words: str
) -> None:
    url = f"{files[0]}/{name}"
    with pytest.raises(fetch.StageError) as e:
        fetch.stage(url, tmp_path)
    assert e.value.status == status and url in e.value.message and words in e.value.message
    assert list(tmp_path.iterdir()) == []  # nothing staged, no temporary left
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_size_limit(files: tuple[str, list[str]], tmp_path: Path) -> None:
    with pytest.raises(fetch.StageError, match="limit of 32 bytes"):
        fetch.stage(f"{files[0]}/good.tgz", tmp_path, Limits(max_bytes=32))


def test_unreachable_host_is_a_gateway_error(tmp_path: Path) -> None:
    with file_server({}) as (url, _):
        pass  # closed: nothing listens there now
    with pytest.raises(fetch.StageError) as e:
        fetch.stage(f"{url}/a.tgz", tmp_path, timeout_s=5)
    assert e.value.status == 502 and "GET failed" in e.value.message


def test_https_with_a_private_ca_needs_the_ca_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tls = self_signed(tmp_path, "127.0.0.1")
    with file_server({"sql.tgz": tar_bytes(adapter_files())}, tls=tls) as (url, _):
        source = f"{url}/sql.tgz"
        assert source.startswith("https://")
        with pytest.raises(fetch.StageError) as e:
            fetch.stage(source, tmp_path / "stage")
        assert e.value.status == 502 and "CERTIFICATE_VERIFY_FAILED" in e.value.message
        monkeypatch.setenv(fetch.CA_BUNDLE_ENV, tls[0].read_text())
        path, _ = fetch.stage(source, tmp_path / "stage")
        assert (path / "adapter_config.json").is_file()


# ------------------------------------------------------------------------------------ s3 (moto)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")  # boto3's own setting
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3")
    client.create_bucket(Bucket="adapters")
    for name, data in adapter_files().items():
        client.put_object(Bucket="adapters", Key=f"dir/sql/{name}", Body=data)
    client.put_object(Bucket="adapters", Key="dir/sql/", Body=b"")  # a console "folder" marker
    client.put_object(Bucket="adapters", Key="packed/sql.tgz", Body=tar_bytes(adapter_files()))
    client.put_object(Bucket="adapters", Key="evil/../x", Body=b"x")
    try:
        yield client
    finally:
        server.stop()


@pytest.mark.parametrize(
    "source", ["s3://adapters/dir/sql", "s3://adapters/dir/sql/", "s3://adapters/packed/sql.tgz"]
)
def test_s3_prefix_or_archive(s3: object, tmp_path: Path, source: str) -> None:
    path, _ = fetch.stage(source, tmp_path)
    assert json.loads((path / "adapter_config.json").read_text())["lora_alpha"] == 16
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize(
    ("source", "status", "words"),
    [
        ("s3://adapters/nothing/here", 404, "no object 'nothing/here'"),
        ("s3://no-such-bucket/x", 404, "NoSuchBucket"),
        ("s3://adapters/evil", 422, "path traversal"),
    ],
)
def test_s3_failures_name_source_and_cause(
    s3: object, tmp_path: Path, source: str, status: int, words: str
) -> None:
    with pytest.raises(fetch.StageError) as e:
        fetch.stage(source, tmp_path)
    assert e.value.status == status and source in e.value.message and words in e.value.message


# ------------------------------------------------------------------------------------ hugging face


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[dict[str, str]]]:
    pytest.importorskip("huggingface_hub")
    repos = {"acme/sql-lora": {"main": adapter_files(8), "v2": adapter_files(16)}}
    with fake_hub(repos) as (url, seen):
        # huggingface_hub reads these at import time (constants.py): patch the module values too
        import huggingface_hub.constants as c

        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(c, "ENDPOINT", url)
        monkeypatch.setattr(
            c, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
        yield seen


def test_hf_revision_is_staged_at_that_revision_with_the_token(
    hub: list[dict[str, str]], tmp_path: Path
) -> None:
    root = tmp_path / "stage"
    path, _ = fetch.stage("hf://acme/sql-lora@v2", root)
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 16  # v2, not main
    assert not (path / ".cache").exists()
    assert any(s["path"].endswith("/revision/v2") for s in hub)
    repo_calls = [s for s in hub if "acme/sql-lora" in s["path"]]
    assert repo_calls and all(s["authorization"] == "Bearer hf_secret" for s in repo_calls)  # HF_TOKEN
    main, _ = fetch.stage("hf://acme/sql-lora@main", root)
    assert json.loads((main / "adapter_config.json").read_text())["r"] == 8 and main != path


@pytest.mark.parametrize(
    ("source", "status", "words"),
    [("hf://acme/sql-lora@v9", 404, "no revision 'v9'"), ("hf://acme/nope@v1", 404, "no repo acme/nope")],
)
def test_hf_failures(hub: list[dict[str, str]], tmp_path: Path, source: str, status: int, words: str) -> None:
    with pytest.raises(fetch.StageError) as e:
        fetch.stage(source, tmp_path / "stage")
    assert e.value.status == status and source in e.value.message and words in e.value.message


def test_hf_repo_over_the_limits_is_refused_before_downloading(
    hub: list[dict[str, str]], tmp_path: Path
) -> None:
    with pytest.raises(fetch.StageError) as e:
        fetch.stage("hf://acme/sql-lora@v2", tmp_path / "stage", Limits(max_bytes=10))
    assert e.value.status == 422 and "limit of 10 bytes" in e.value.message
    assert not any("/resolve/" in s["path"] for s in hub)  # nothing fetched


# ------------------------------------------------------------------------------------ the endpoint


async def test_endpoint_shares_one_download_and_answers_errors_as_openai_errors(tmp_path: Path) -> None:
    with file_server(_hostile()) as (url, hits):
        runner = web.AppRunner(make_app(Stager(tmp_path)))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with aiohttp.ClientSession() as s:

                async def post(doc: object) -> tuple[int, dict[str, object]]:
                    async with s.post(base + "/stage", json=doc) as r:
                        return r.status, await r.json()

                good = f"{url}/good.tgz"
                answers = await asyncio.gather(*(post({"source": good}) for _ in range(8)))
                assert {st for st, _ in answers} == {200}
                assert {d["path"] for _, d in answers} == {str(tmp_path / stage_name(good))}
                assert hits.count("good.tgz") == 1  # eight concurrent calls, one download
                st, doc = await post({"source": f"{url}/traversal.tgz"})
                err = doc["error"]
                assert st == 422 and isinstance(err, dict) and "path traversal" in err["message"]
                assert f"{url}/traversal.tgz" in err["message"]
                st, doc = await post({"nosource": 1})
                assert st == 400
                async with s.get(base + "/health") as r:
                    assert r.status == 200
        finally:
            await runner.cleanup()
