"""Remote files (``http(s)://`` and ``s3://`` URLs): opening for streaming reads, listing, stat; retries.

Every remote access of the data side goes through here; a local path never does (callers test
``is_remote`` first and keep the built-in ``open``). Transport is fsspec: its HTTP filesystem (aiohttp)
for ``http(s)://`` and s3fs for ``s3://`` and S3-compatible stores (MinIO, Baidu BOS, ...), configured
the usual way:

* ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``): the endpoint of an S3-compatible store;
* credentials and region: the standard AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE``, ``~/.aws/config``, ...), read by botocore; nothing here logs them.

A remote file is read in blocks of ``BLOCK_SIZE`` bytes by range requests: a tar streams member by
member, a parquet reads its footer and then the row groups it is asked for, a part file line by line;
nothing is copied to local disk. A transient failure (connection refused or reset, a response cut
short, HTTP 5xx or 429, ``SD_REMOTE_TIMEOUT`` = 60 s without progress) is retried at the same byte offset
after a backoff (1 s, doubling, at most ``SD_REMOTE_RETRIES`` times, default 5; the first wait is
``SD_REMOTE_BACKOFF`` seconds); each
retry is counted by reason (``RETRY_REASONS``) into the counter ``counting_retries`` names, which the
record stream reports with its skips. A file still failing after the last retry raises
``RemoteUnreachable``; a URL the server answers with 404 raises ``FileNotFoundError`` at once (S3's
access denied ``PermissionError``), as a local file would.
"""

from __future__ import annotations

import contextvars
import io
import os
import posixpath
import random
import re
import time
from collections.abc import Iterator

SCHEMES = ("http://", "https://", "s3://")
BLOCK_SIZE = 4 * 2**20  # bytes per range request: one block cached per open file
RETRY_REASONS = ("retry_connection", "retry_server_error", "retry_timeout")
DEFAULT_RETRIES = 5  # retries of one open or read (SD_REMOTE_RETRIES)
DEFAULT_BACKOFF = 1.0  # seconds before the first retry, doubling each time (SD_REMOTE_BACKOFF)
MAX_BACKOFF = 30.0  # seconds: the longest wait between two attempts
DEFAULT_TIMEOUT = 60.0  # seconds to connect, or between two pieces of a response (SD_REMOTE_TIMEOUT)

_retry_counter: contextvars.ContextVar = contextvars.ContextVar("sd_remote_retry_counter", default=None)
_jitter = random.Random()  # private: the global `random` state of training stays untouched


class RemoteUnreachable(OSError):
    """A remote file that kept failing with transient errors after every retry."""


# A URL inside any text: up to whitespace, a quote or <> (a bracket or comma may belong to a secret)
_URL = re.compile(r"(?:https?|s3)://[^\s'\"<>]+", re.IGNORECASE)
HIDDEN = "***"


def _redact_url(url: str) -> str:
    scheme, _, rest = url.partition("://")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    userinfo, at, host = netloc.rpartition("@")
    if at:  # user:password@ or token@: both hidden
        netloc = (f"{HIDDEN}:{HIDDEN}" if ":" in userinfo else HIDDEN) + "@" + host
    path, question, query = tail.partition("?")
    if question:
        query, hash_, fragment = query.partition("#")
        query = "&".join(k + ("=" + HIDDEN if eq else "") for k, eq, _ in (q.partition("=") for q in query.split("&")))
        tail = path + "?" + query + hash_ + fragment
    return f"{scheme}://{netloc}{tail}"


def redact(text) -> str:
    """``text`` (a path, a URL, or a message naming URLs) with the credentials of every URL in it hidden.

    The user and password of a URL's userinfo become ``***``, and so does the value of every query parameter
    (presigned URLs carry their signature, credential and session token there, as other services carry ``token``,
    ``sig`` or ``key``: no list of names is complete). Scheme, host, port, path and the query's keys stay, so a
    message still tells which file it is about. Idempotent; a local path comes back unchanged.

    Example: ``https://user:secret@host/x.tar?X-Amz-Signature=abc`` → ``https://***:***@host/x.tar?X-Amz-Signature=***``.
    """
    def one(match):
        url, after = match.group(0), ""
        while url.endswith(")") and url.count(")") > url.count("("):  # "(see https://h/x)": the ")" is the text's
            url, after = url[:-1], ")" + after
        return _redact_url(url) + after

    return _URL.sub(one, str(text))


def is_remote(path) -> bool:
    """True for an ``http://``, ``https://`` or ``s3://`` URL (a ``pathlib`` path is always local)."""
    return isinstance(path, str) and path.startswith(SCHEMES)


def _setting(name: str, default: float, kind=float):
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number; unset it or give e.g. {name}={default}") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r} is negative")
    return value


def _filesystem(url: str):
    """The fsspec filesystem for ``url`` (fsspec keeps one instance per process and settings)."""
    import fsspec

    timeout = _setting("SD_REMOTE_TIMEOUT", DEFAULT_TIMEOUT)
    if url.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        # One retry layer, ours (it counts): s3fs's and botocore's own are switched off.
        config = {"retries": {"total_max_attempts": 1}, "connect_timeout": timeout, "read_timeout": timeout}
        fs = fsspec.filesystem("s3", endpoint_url=endpoint, config_kwargs=config, default_block_size=BLOCK_SIZE)
        fs.retries = 1  # s3fs's attempts per request (a class attribute in s3fs 2024.5)
        return fs
    import aiohttp

    client = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)}
    return fsspec.filesystem("https" if url.startswith("https://") else "http", client_kwargs=client,
                             block_size=BLOCK_SIZE)


# ---------------------------------------------------------------------------------------------
# What is worth retrying
# ---------------------------------------------------------------------------------------------
def _causes(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _error_types():
    """(timeouts, connection errors, every transport error) of the installed transports: what a remote step raises."""
    timeouts, connection, other = [TimeoutError], [ConnectionError, EOFError], [OSError]
    try:
        import aiohttp

        connection += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
        other.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        from botocore import exceptions as boto

        timeouts += [boto.ReadTimeoutError, boto.ConnectTimeoutError]
        connection += [boto.HTTPClientError, boto.ResponseStreamingError]
        other += [boto.BotoCoreError, boto.ClientError]
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        timeouts.append(FSTimeoutError)
    except ImportError:
        pass
    return tuple(timeouts), tuple(connection), tuple(timeouts + connection + other)


def _status(err: BaseException) -> int | None:
    """The HTTP status an aiohttp or botocore error carries, if any."""
    status = getattr(err, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int):
        return status
    response = getattr(err, "response", None)  # botocore.exceptions.ClientError
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def retry_reason(err: BaseException) -> str | None:
    """The ``RETRY_REASONS`` key of a transient failure, or None for one that retrying cannot mend.

    The exception and its causes are examined (fsspec wraps a failed connection into ``FileNotFoundError``,
    s3fs a server error into ``OSError``): an HTTP status decides when there is one (5xx and 429 are
    transient, 404 and the like are not); else a timeout, a connection error or a response cut short is.
    """
    timeouts, connection, _ = _error_types()
    for e in _causes(err):
        status = _status(e)
        if status is not None:
            return "retry_server_error" if status >= 500 or status == 429 else None
        if isinstance(e, timeouts):
            return "retry_timeout"
        if isinstance(e, connection):
            return "retry_connection"
    return None


def counting_retries(records: Iterator, counter) -> Iterator:
    """Iterate ``records`` with the retries of the remote reads they make counted into ``counter``.

    ``counter`` (a ``collections.Counter``) is in force only while ``records`` computes its next item,
    so several such iterators may be interleaved in one thread, each counting its own retries.
    """
    it = iter(records)
    while True:
        token = _retry_counter.set(counter)
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            _retry_counter.reset(token)
        yield item


def _with_retries(what: str, url: str, call):
    """``call()``, retried on transient failures; raises ``RemoteUnreachable`` once retries run out."""
    retries = int(_setting("SD_REMOTE_RETRIES", DEFAULT_RETRIES, int))
    wait = _setting("SD_REMOTE_BACKOFF", DEFAULT_BACKOFF)
    transport_errors = _error_types()[2]
    attempt = 0
    while True:
        try:
            return call()
        except transport_errors as err:
            reason = retry_reason(err)
            if reason is None:
                raise
            root = list(_causes(err))[-1]  # e.g. the refused connection behind fsspec's FileNotFoundError
            said = f"{type(root).__name__}: {root}"
            if attempt >= retries:
                raise RemoteUnreachable(redact(f"{url}: {what} failed {attempt + 1} times, last with {said}")) from err
            counter = _retry_counter.get()
            if counter is not None:
                counter[reason] += 1
            pause = min(wait * 2**attempt, MAX_BACKOFF) * (0.5 + 0.5 * _jitter.random())
            # imported here: sd.log imports paddlenlp, which the data tools need not load
            from sd.log import logger

            logger.warning(redact(f"{url}: {what} failed ({said}); retry {attempt + 1} of {retries} "
                                  f"in {pause:.1f} s, counted as {reason}"))
            time.sleep(pause)
            attempt += 1


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
class _RetryingReader(io.RawIOBase):
    """A seekable, read-only raw stream over a remote file; a failed read is retried at its offset."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self._file = _with_retries("opening", url, lambda: _filesystem(url).open(url, "rb", block_size=BLOCK_SIZE))
        self.size = self._file.size
        self._pos = 0
        if self.size is None:
            self._file.close()
            raise OSError(redact(f"{url}: the server gives no Content-Length; remote files are read by range "
                                 "requests, which need it"))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self.size or not len(view):
            return 0

        def read():
            self._file.seek(self._pos)
            return self._file.read(min(len(view), self.size - self._pos))

        try:
            data = _with_retries(f"reading at byte {self._pos}", self.url, read)
        except ValueError as err:  # fsspec: the server ignores Range headers
            raise OSError(redact(f"{self.url}: {err}")) from None
        view[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed and hasattr(self, "_file"):
            self._file.close()
        super().close()


def open_binary(url: str) -> io.BufferedReader:
    """A buffered, seekable binary stream over the remote file ``url``, read in range requests.

    Raises:
        FileNotFoundError: not there (HTTP: any 4xx answer; fsspec reports them so).
        PermissionError: S3 denies access.
        OSError: the server does not serve byte ranges (also later, from a read).
        RemoteUnreachable: transient failures outlasted the retries (also later, from a read).
    """
    return io.BufferedReader(_RetryingReader(url), buffer_size=min(2**16, BLOCK_SIZE))


def read_text(url: str) -> str:
    """The whole (small) remote text file ``url``, UTF-8: a file list or a stats file."""
    with open_binary(url) as f:
        return f.read().decode("utf-8")


# ---------------------------------------------------------------------------------------------
# Folders and stat
# ---------------------------------------------------------------------------------------------
def _with_scheme(url: str, name: str) -> str:
    scheme = url.split("://", 1)[0] + "://"
    return name if name.startswith(SCHEMES) else scheme + name.lstrip("/")


def list_folder(url: str) -> dict[str, str]:
    """Entries of the remote folder ``url`` (an S3 prefix, or an HTTP index page): name → ``file``/``directory``."""
    fs = _filesystem(url)
    entries = _with_retries("listing", url, lambda: fs.ls(url.rstrip("/") + "/", detail=True))
    found = {}
    for e in entries:
        name = posixpath.basename(_with_scheme(url, e["name"]).rstrip("/"))
        if name:
            found[name] = "directory" if e.get("type") == "directory" else "file"
    return found


def isdir(url: str) -> bool:
    """True when ``url`` is a remote folder (an S3 prefix holding objects, or an HTTP URL ending in ``/``)."""
    if url.startswith(("http://", "https://")):
        return url.endswith("/")
    fs = _filesystem(url)
    return bool(_with_retries("looking up", url, lambda: fs.isdir(url)))


def exists(url: str) -> bool:
    """True when ``url`` names a remote file or folder."""
    fs = _filesystem(url)
    return bool(_with_retries("looking up", url, lambda: fs.exists(url)))


def size(url: str) -> int:
    """Bytes of the remote file ``url``."""
    fs = _filesystem(url)
    return int(_with_retries("looking up", url, lambda: fs.size(url)))


def join(folder_url: str, *names: str) -> str:
    """``folder_url/name``: a path relative to a remote folder."""
    return posixpath.join(folder_url.rstrip("/") + "/", *names)

