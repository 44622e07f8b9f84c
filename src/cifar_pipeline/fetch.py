"""Fetch the CIFAR archive from a URL or a local copy, verified by md5.

The output path only ever holds a whole, verified archive: bytes go to a
`.part` file beside it, which is renamed into place after the md5 matches.
HTTP downloads resume with `Range` after a dropped connection, retry 5xx and
network errors a bounded number of times, and never follow a redirect to
another scheme or host without saying so. A host that cannot be reached at all
on the first try (no network) fails at once, saying how to use a local copy.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import requests
from tqdm import tqdm
from urllib3.exceptions import NewConnectionError  # name not resolved, or refused

from cifar_pipeline.errors import PipelineError

log = logging.getLogger(__name__)

OFFICIAL = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85"),
}
CHUNK = 1 << 20
# Small network reads: bytes of a read cut short by a dropped connection are lost,
# so this bounds what a resume has to fetch again.
NET_CHUNK = 1 << 16
MAX_REDIRECTS = 5
# 408/429 and 5xx are the server saying "not now"; any other 4xx will not change on retry.
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class FetchError(PipelineError):
    """The archive could not be fetched or did not verify."""


class _Retryable(Exception):
    pass


class _Unreachable(_Retryable):
    """No connection could be made: the host name did not resolve, or the port refused."""


def _offline_message(url: str, md5: str, err: _Unreachable) -> str:
    name = Path(urlparse(url).path).name or "archive.tar.gz"
    return (f"cannot reach {urlparse(url).netloc} to download {url}: {err}. "
            f"Without internet, use a local copy of the archive (data.url is a path or URL, data.md5 "
            f"its md5), e.g.: dvc exp run -S data.url=/path/to/{name} -S data.md5={md5} "
            "(or set both in params.yaml). Nothing was written.")


def resolve_source(dataset: str, url: str | None, md5: str | None) -> tuple[str, str]:
    """The (url, md5) to fetch: the official pair unless params override them."""
    official_url, official_md5 = OFFICIAL[dataset]
    if url is None:
        return official_url, md5 or official_md5
    if md5 is None:
        if url == official_url:
            return url, official_md5
        raise FetchError(f"data.url is set to {url!r}, so data.md5 must be set too "
                         "(the md5 of that archive); only the official URLs have a known md5")
    return url, md5


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, md5: str, out: Path, timeout_s: float = 60.0, retries: int = 5,
          progress: bool = True) -> Path:
    """Put the archive at `url` (http(s), file:// or a local path) at `out`, verified."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    scheme = urlparse(url).scheme
    try:
        if scheme in ("http", "https"):
            _download(url, md5, part, timeout_s, retries, progress)
        elif scheme == "file" or scheme == "" or len(scheme) == 1:  # len 1: a Windows drive letter
            _copy_local(_local_path(url), part, progress)
        else:
            raise FetchError(f"unsupported URL scheme {scheme!r} in {url!r}; use http(s)://, file:// or a path")
        actual = md5sum(part)
        if actual != md5:
            raise FetchError(f"md5 mismatch for {url}: expected {md5}, got {actual}; "
                             "the file is corrupt or not the archive data.md5 describes, "
                             "and nothing was written to " + str(out))
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out


def _local_path(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise FetchError(f"file:// URL with a remote host is not supported: {url!r}")
        return Path(unquote(parsed.path))
    return Path(url)


def _copy_local(src: Path, part: Path, progress: bool) -> None:
    if not src.is_file():
        raise FetchError(f"archive not found: {src} (set data.url to the archive's path or URL, "
                         "or to null for the official download)")
    with open(src, "rb") as fin, open(part, "wb") as fout, \
            tqdm(total=src.stat().st_size, unit="B", unit_scale=True, desc=f"copy {src.name}",
                 disable=not progress) as bar:
        for block in iter(lambda: fin.read(CHUNK), b""):
            fout.write(block)
            bar.update(len(block))


def _download(url: str, md5: str, part: Path, timeout_s: float, retries: int, progress: bool) -> None:
    part.unlink(missing_ok=True)
    last_error = None
    for attempt in range(retries + 1):
        if attempt:
            delay = min(2.0 ** (attempt - 1), 30.0)
            log.warning(f"fetch: attempt {attempt} failed ({last_error}); retrying in {delay:.0f}s")
            time.sleep(delay)
        try:
            _download_once(url, part, timeout_s, progress)
            return
        except _Unreachable as err:
            # Unreachable on the first try: offline, or a wrong address; half a minute of
            # retries would not change that. Later (a server restarting) it is retried.
            if not attempt:
                raise FetchError(_offline_message(url, md5, err)) from err
            last_error = err
        except _Retryable as err:
            last_error = err
    raise FetchError(f"giving up on {url} after {retries + 1} attempts; last error: {last_error}")


def _download_once(url: str, part: Path, timeout_s: float, progress: bool) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = _get_following_safe_redirects(url, headers, timeout_s)
    except requests.ConnectionError as err:
        reason = getattr(err.args[0] if err.args else None, "reason", None)
        if isinstance(reason, NewConnectionError):
            # urllib3 puts "HTTPSConnection(host=..., port=...): " before what went wrong.
            raise _Unreachable(str(reason).split("): ", 1)[-1]) from err
        raise _Retryable(f"{type(err).__name__}: {err}") from err
    except requests.RequestException as err:
        raise _Retryable(f"{type(err).__name__}: {err}") from err
    with response:
        if response.status_code in RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {response.status_code}")
        if response.status_code == 416:  # our Range is past the end: start over
            part.unlink(missing_ok=True)
            raise _Retryable("HTTP 416 on resume; restarting from zero")
        if response.status_code not in (200, 206):
            raise FetchError(f"HTTP {response.status_code} for {url}")
        if response.status_code == 206 and _range_start(response) == have:
            mode, total_done = "ab", have
        else:  # the server ignored Range: the body is the whole file
            mode, total_done = "wb", 0
        length = response.headers.get("Content-Length")
        total = total_done + int(length) if length and length.isdigit() else None
        received = 0
        try:
            with open(part, mode) as f, tqdm(total=total, initial=total_done, unit="B", unit_scale=True,
                                             desc=f"download {Path(urlparse(url).path).name}",
                                             disable=not progress) as bar:
                for block in response.iter_content(NET_CHUNK):
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
        except requests.RequestException as err:
            raise _Retryable(f"connection lost after {total_done + received} bytes: {err}") from err
        if length and length.isdigit() and received < int(length):
            raise _Retryable(f"connection closed after {received} of {length} bytes")


def _range_start(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Range", "")  # "bytes START-END/TOTAL"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _get_following_safe_redirects(url: str, headers: dict, timeout_s: float) -> requests.Response:
    origin = urlparse(url)
    for _ in range(MAX_REDIRECTS + 1):
        response = requests.get(url, headers=headers, stream=True, timeout=timeout_s, allow_redirects=False)
        if not response.is_redirect:
            return response
        target = urljoin(url, response.headers["Location"])
        response.close()
        moved = urlparse(target)
        if (moved.scheme, moved.netloc) != (origin.scheme, origin.netloc):
            raise FetchError(f"{url} redirects to {target} (another scheme or host); refusing to "
                             "follow it silently: set data.url to that address if you trust it")
        url = target
    raise FetchError(f"too many redirects starting from {origin.geturl()}")

