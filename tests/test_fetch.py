"""Fetching: local copies, HTTP with faults on a loopback server, md5 checks, no partial outputs."""
from __future__ import annotations

import hashlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cifar_pipeline import fetch as fetch_mod
from cifar_pipeline import params as params_lib
from cifar_pipeline.fetch import FetchError, fetch, resolve_source

BODY = bytes(range(256)) * 4096  # 1 MiB
MD5 = hashlib.md5(BODY).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append(dict(self.headers))
        behaviour = server.behaviours.pop(0) if server.behaviours else "ok"
        if behaviour == "503":
            self.send_error(503)
            return
        if behaviour == "404":
            self.send_error(404)
            return
        if behaviour == "redirect_other_host":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{server.server_port}/archive.tar.gz")
            self.end_headers()
            return
        if behaviour == "stall":
            time.sleep(1.5)
        start = 0
        range_header = self.headers.get("Range")
        if range_header and behaviour != "ignore_range":
            start = int(range_header.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(BODY) - start))
        self.end_headers()
        if behaviour == "drop":  # half the body, then the connection dies
            self.wfile.write(BODY[start:start + (len(BODY) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(BODY[start:])


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(fetch_mod.time, "sleep", lambda s: None)  # no backoff waits in tests
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.behaviours, httpd.requests = [], []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(httpd):
    return f"http://127.0.0.1:{httpd.server_port}/archive.tar.gz"


def _outputs(directory):
    return sorted(p.name for p in directory.iterdir())


def test_plain_download(server, tmp_path):
    out = fetch(_url(server), MD5, tmp_path / "a.tar.gz", progress=False)
    assert out.read_bytes() == BODY and _outputs(tmp_path) == ["a.tar.gz"]


def test_dropped_connection_resumes_with_range(server, tmp_path):
    server.behaviours = ["drop"]
    fetch(_url(server), MD5, tmp_path / "a.tar.gz", retries=2, progress=False)
    assert (tmp_path / "a.tar.gz").read_bytes() == BODY
    assert "Range" not in server.requests[0]
    assert server.requests[1]["Range"] == f"bytes={len(BODY) // 2}-"


def test_server_that_ignores_range_restarts_from_zero(server, tmp_path):
    server.behaviours = ["drop", "ignore_range"]
    fetch(_url(server), MD5, tmp_path / "a.tar.gz", retries=2, progress=False)
    assert (tmp_path / "a.tar.gz").read_bytes() == BODY


def test_5xx_is_retried_then_succeeds(server, tmp_path):
    server.behaviours = ["503", "503"]
    fetch(_url(server), MD5, tmp_path / "a.tar.gz", retries=2, progress=False)
    assert len(server.requests) == 3


def test_stall_past_timeout_is_retried(server, tmp_path):
    server.behaviours = ["stall"]
    fetch(_url(server), MD5, tmp_path / "a.tar.gz", timeout_s=0.3, retries=1, progress=False)
    assert (tmp_path / "a.tar.gz").read_bytes() == BODY


def test_gives_up_after_bounded_retries_leaving_nothing(server, tmp_path):
    server.behaviours = ["503"] * 10
    with pytest.raises(FetchError, match=r"giving up on .* after 3 attempts; last error: HTTP 503"):
        fetch(_url(server), MD5, tmp_path / "a.tar.gz", retries=2, progress=False)
    assert len(server.requests) == 3 and _outputs(tmp_path) == []


def test_client_errors_are_not_retried(server, tmp_path):
    server.behaviours = ["404"]
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(_url(server), MD5, tmp_path / "a.tar.gz", retries=3, progress=False)
    assert len(server.requests) == 1 and _outputs(tmp_path) == []


def test_redirect_to_another_host_is_refused(server, tmp_path):
    server.behaviours = ["redirect_other_host"]
    with pytest.raises(FetchError, match="redirects to http://localhost:.*another scheme or host"):
        fetch(_url(server), MD5, tmp_path / "a.tar.gz", progress=False)
    assert _outputs(tmp_path) == []


def test_md5_mismatch_names_file_expected_and_actual_and_leaves_nothing(server, tmp_path):
    wrong = "0" * 32
    with pytest.raises(FetchError) as err:
        fetch(_url(server), wrong, tmp_path / "a.tar.gz", progress=False)
    assert f"md5 mismatch for {_url(server)}: expected {wrong}, got {MD5}" in str(err.value)
    assert _outputs(tmp_path) == []


@pytest.mark.parametrize("as_url", [False, True])
def test_local_path_and_file_url(tmp_path, as_url):
    src = tmp_path / "src.tar.gz"
    src.write_bytes(BODY)
    out_dir = tmp_path / "out"
    fetch(src.as_uri() if as_url else str(src), MD5, out_dir / "a.tar.gz", progress=False)
    assert (out_dir / "a.tar.gz").read_bytes() == BODY and _outputs(out_dir) == ["a.tar.gz"]


def test_missing_local_file_explains_how_to_fix(tmp_path):
    with pytest.raises(FetchError, match="archive not found: .*or to null for the official download"):
        fetch(str(tmp_path / "nope.tar.gz"), MD5, tmp_path / "a.tar.gz", progress=False)


def test_existing_output_survives_a_failed_fetch(tmp_path):
    out = tmp_path / "a.tar.gz"
    out.write_bytes(b"previous good archive")
    src = tmp_path / "src.tar.gz"
    src.write_bytes(BODY)
    with pytest.raises(FetchError, match="md5 mismatch"):
        fetch(str(src), "f" * 32, out, progress=False)
    assert out.read_bytes() == b"previous good archive"


def test_resolve_source_defaults_to_the_official_archive():
    url, md5 = resolve_source("cifar100", None, None)
    assert url.endswith("cifar-100-python.tar.gz") and md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert resolve_source("cifar10", "/x.tar.gz", "a" * 32) == ("/x.tar.gz", "a" * 32)
    with pytest.raises(FetchError, match="data.md5 must be set too"):
        resolve_source("cifar10", "/x.tar.gz", None)


def test_the_committed_params_fetch_the_official_cifar10():
    # A fresh clone with internet runs `dvc repro` on the real data, not on a local copy.
    data = params_lib.load(Path(__file__).parents[1] / "params.yaml")["data"]
    assert resolve_source(data["dataset"], data["url"], data["md5"]) == fetch_mod.OFFICIAL["cifar10"]


def test_unknown_host_fails_at_once_saying_how_to_use_a_local_copy(tmp_path):
    # ".invalid" never resolves (RFC 2606), with or without internet: the offline case.
    url = "https://cifar.invalid/~kriz/cifar-10-python.tar.gz"
    start = time.monotonic()  # real backoff sleeps: retries would take 31 s
    with pytest.raises(FetchError) as err:
        fetch(url, MD5, tmp_path / "a.tar.gz", retries=5, progress=False)
    message = str(err.value)
    assert message.startswith("cannot reach cifar.invalid to download " + url)
    assert f"-S data.url=/path/to/cifar-10-python.tar.gz -S data.md5={MD5}" in message
    assert time.monotonic() - start < 10 and _outputs(tmp_path) == []


def test_refused_connection_fails_at_once(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/archive.tar.gz"
        start = time.monotonic()  # real backoff sleeps: retries would take 31 s
        with pytest.raises(FetchError, match="cannot reach 127.0.0.1:.*Nothing was written"):
            fetch(url, MD5, tmp_path / "a.tar.gz", retries=5, progress=False)
    assert time.monotonic() - start < 10 and _outputs(tmp_path) == []
