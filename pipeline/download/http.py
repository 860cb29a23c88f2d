"""HTTP transport of the download stage: retries with backoff, Range resume, token redaction.

One :class:`HttpClient` wraps a :class:`requests.Session`. Every request is retried on the
conditions that may clear by themselves (timeouts, connection resets, bodies cut short,
HTTP 408/429/5xx), with exponential backoff and full jitter up to a stated cap of
attempts; ``Retry-After`` is honoured (capped). A bearer token, where one is given, is
sent in the ``Authorization`` header only and is removed from every message this module
builds, so it cannot reach a log, a file or an error.

The token goes only to the archive hosts it is meant for: per request, and only when the
URL's host is one of the client's *token hosts* and its scheme is https (loopback hosts,
used by tests, also over http); see :func:`may_send_token`. The token hosts are those of
the configured archive base URLs (:meth:`HttpClient.allow_token_host`, called by
:class:`~pipeline.download.nbia.NbiaClient` and by ``xrai download --base-url``), the
loopback names, and any listed in ``$XRAI_TOKEN_HOSTS``; hosts named only by a file list
get no token. A redirect never carries the token to another host, scheme or port:
:meth:`requests.Session.rebuild_auth` drops ``Authorization`` on such a hop.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from urllib3.util import parse_url

from pipeline.download.errors import ChecksumError, DownloadError

__all__ = [
    "LOOPBACK_HOSTS",
    "TOKEN_HOSTS_ENV",
    "AccessRefusedError",
    "HttpClient",
    "RetryPolicy",
    "TransientStatusError",
    "may_send_token",
    "normalize_host",
    "parse_retry_after",
    "redact",
    "retry_call",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Statuses that may clear by themselves: request timeout, rate limit, server errors.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

#: Placeholder that replaces a secret in messages.
REDACTED = "***"

CHUNK = 1 << 16

#: Comma-separated hosts (or URLs) that may receive the bearer token besides the
#: configured archives, e.g. ``XRAI_TOKEN_HOSTS=mirror.example.org,files.example.org``.
TOKEN_HOSTS_ENV = "XRAI_TOKEN_HOSTS"

#: Hosts that may receive the token over plain http too (the loopback servers of tests).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before trying again.

    Parameters
    ----------
    max_attempts : int, default 6
        The cap: total attempts per request, the first included (>= 1).
    base_delay : float, default 1.0
        Seconds; the backoff ceiling of attempt ``k`` (1-based) is
        ``min(max_delay, base_delay * 2**(k-1))``.
    max_delay : float, default 60.0
        Largest backoff ceiling, in seconds.
    max_retry_after : float, default 300.0
        Largest wait granted to a server's ``Retry-After``, in seconds.

    Notes
    -----
    "Full jitter": the wait after failed attempt ``k`` is drawn uniformly from
    ``[0, min(max_delay, base_delay * 2**(k-1))]``, which spreads clients that failed
    together [1]_. A ``Retry-After`` from the server replaces the draw.

    References
    ----------
    .. [1] Brooker, M. (2015). Exponential backoff and jitter. AWS Architecture Blog.
       https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/
    """

    max_attempts: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retry_after: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts!r}")
        for name in ("base_delay", "max_delay", "max_retry_after"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")

    def delay(self, attempt: int, *, retry_after: float | None = None,
              rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return (rng or random).uniform(0.0, ceiling)


class AccessRefusedError(DownloadError):
    """HTTP 401 or 403: the server wants a (different) token, or the data is not public."""

    def __init__(self, what: str, reason: str, *, status: int) -> None:
        super().__init__(what, reason)
        self.status = status


class BadRequestError(DownloadError):
    """HTTP 400: the server refused the request's parameters (NBIA does so for unknown ones)."""


class TransientStatusError(DownloadError):
    """An HTTP status worth retrying (408, 429, 5xx), with the server's ``Retry-After``."""

    def __init__(self, what: str, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(what, reason, retryable=True)
        self.retry_after = retry_after


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date, RFC 9110 §10.2.3).

    Returns None for a missing or unparseable value.

    Examples
    --------
    >>> parse_retry_after("7")
    7.0
    >>> parse_retry_after("soon") is None
    True
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every non-empty secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def normalize_host(value: str) -> str:
    """The host name of `value` (a bare host, ``host:port`` or a URL), lower case.

    Brackets of IPv6 literals and a trailing dot are removed.

    Raises
    ------
    ValueError
        `value` names no host.

    Examples
    --------
    >>> normalize_host("https://Services.CancerImagingArchive.net./nbia-api")
    'services.cancerimagingarchive.net'
    >>> normalize_host("[::1]:8080")
    '::1'
    """
    text = value.strip()
    try:
        host = urlsplit(text if "://" in text else f"//{text}").hostname
    except ValueError as err:
        raise ValueError(f"cannot read a host name from {value!r}: {err}") from err
    host = (host or "").rstrip(".")
    if not host:
        raise ValueError(f"{value!r} names no host; expected a host name or an http(s) URL")
    return host


def _token_refusal(url: str, hosts: Iterable[str]) -> tuple[str, str] | None:
    """``(host, reason)`` when the token must not go to `url`, None when it may.

    The URL is first normalised as :mod:`requests` sends it, and its host is read by both
    :func:`urllib.parse.urlsplit` and urllib3's parser (the one that opens the
    connection); they must agree, so that no odd URL (``https://a\\@b/``) reads as an
    archive host to one parser and as another host to the other.
    """
    try:
        prepared = requests.PreparedRequest()
        prepared.prepare_url(url, None)
        sent = prepared.url or ""
        split, parsed = urlsplit(sent), parse_url(sent)
    except (requests.RequestException, ValueError) as err:
        return "?", f"unreadable URL ({type(err).__name__})"
    host = (split.hostname or "").rstrip(".")
    other = (parsed.host or "").strip("[]").lower().rstrip(".")
    scheme = (split.scheme or "").lower()
    if not host or host != other:
        return host or "?", "its host name is ambiguous"
    if host not in set(hosts):
        return host, "not a configured archive host"
    if scheme == "https" or (scheme == "http" and host in LOOPBACK_HOSTS):
        return None
    return host, f"{scheme or 'no'} scheme (the token goes over https only)"


def may_send_token(url: str, hosts: Iterable[str]) -> bool:
    """Whether a request to `url` may carry the bearer token.

    Parameters
    ----------
    url : str
        The request URL, as it will be sent (query included).
    hosts : iterable of str
        Allowed host names, normalised (:func:`normalize_host`).

    Returns
    -------
    bool
        True when the URL's host is exactly one of `hosts` (no suffix or subdomain
        match) and its scheme is https, or, for a loopback host (:data:`LOOPBACK_HOSTS`),
        http or https.

    Examples
    --------
    >>> hosts = {"services.cancerimagingarchive.net", "127.0.0.1"}
    >>> may_send_token("https://services.cancerimagingarchive.net/nbia-api", hosts)
    True
    >>> may_send_token("http://services.cancerimagingarchive.net/nbia-api", hosts)
    False
    >>> may_send_token("https://services.cancerimagingarchive.net@evil.example/", hosts)
    False
    >>> may_send_token("http://127.0.0.1:8000/list.csv", hosts)
    True
    """
    return _token_refusal(url, hosts) is None


def _hosts_from_env() -> set[str]:
    """The hosts of ``$XRAI_TOKEN_HOSTS``."""
    raw = os.environ.get(TOKEN_HOSTS_ENV, "")
    hosts = set()
    for entry in raw.split(","):
        if entry.strip():
            try:
                hosts.add(normalize_host(entry))
            except ValueError as err:
                raise ValueError(f"${TOKEN_HOSTS_ENV}: entry {entry.strip()!r} is not a host "
                                 f"name or URL ({err})") from err
    return hosts


def retry_call(fn: Callable[[int], T], *, what: str, policy: RetryPolicy,
               sleep: Callable[[float], None] = time.sleep,
               rng: random.Random | None = None,
               secrets: Iterable[str | None] = ()) -> T:
    """Call ``fn(attempt)`` until it succeeds, retrying retryable :class:`DownloadError`.

    Parameters
    ----------
    fn : callable
        Takes the 1-based attempt number; raises :class:`DownloadError` on failure.
    what : str
        The series or file, for messages.
    policy : RetryPolicy
    sleep, rng :
        Injected for tests (no real waiting).
    secrets : iterable of str
        Removed from logged messages.

    Raises
    ------
    DownloadError
        The first non-retryable error as it is, or, once the cap is reached, an error
        naming `what`, the number of attempts and the last reason.
    """
    secrets = tuple(secrets)
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return fn(attempt)
        except DownloadError as err:
            if not err.retryable:
                raise
            if attempt == policy.max_attempts:
                raise DownloadError(
                    what,
                    f"gave up after {attempt} attempts (retry cap {policy.max_attempts}); "
                    f"last error: {redact(err.reason, secrets)}",
                ) from err
            wait = policy.delay(attempt, retry_after=getattr(err, "retry_after", None), rng=rng)
            logger.warning("%s: attempt %d/%d failed (%s); retrying in %.2f s", what, attempt,
                           policy.max_attempts, redact(err.reason, secrets), wait)
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


class HttpClient:
    """A retrying HTTP client for archive APIs and file servers.

    Parameters
    ----------
    token : str, optional
        Bearer token sent as ``Authorization: Bearer <token>`` (an institutional
        mirror); never logged, never part of an error message. Sent only where
        :func:`may_send_token` allows, with :attr:`token_hosts`.
    timeout : float or (float, float), default (10, 120)
        Connect and read timeouts in seconds (read: the longest silence between bytes).
    policy : RetryPolicy, optional
    sleep : callable, default time.sleep
        Injected in tests so that backoff does not wait.
    rng : random.Random, optional
        Source of the jitter.
    session : requests.Session, optional
    token_hosts : iterable of str, optional
        Hosts (names or URLs) that may receive the token, replacing the default: the
        loopback names (:data:`LOOPBACK_HOSTS`) and those listed in ``$XRAI_TOKEN_HOSTS``
        (comma-separated). The archive clients add their configured base URL's host with
        :meth:`allow_token_host` either way.

    Raises
    ------
    ValueError
        An entry of `token_hosts` or ``$XRAI_TOKEN_HOSTS`` names no host.
    """

    def __init__(self, *, token: str | None = None,
                 timeout: float | tuple[float, float] = (10.0, 120.0),
                 policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None,
                 session: requests.Session | None = None,
                 token_hosts: Iterable[str] | None = None) -> None:
        self._token = token or None
        self.timeout = timeout
        self.policy = policy or RetryPolicy()
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = "xrai-pipeline-download"
        # Per request only (see _open): a session-wide header would reach every host.
        self.session.headers.pop("Authorization", None)
        self._token_hosts = ({normalize_host(h) for h in token_hosts} if token_hosts is not None
                             else set(LOOPBACK_HOSTS) | _hosts_from_env())
        self._withheld: set[str] = set()

    def __repr__(self) -> str:
        return (f"HttpClient(token={'set' if self._token else 'none'}, timeout={self.timeout!r}, "
                f"token_hosts={sorted(self._token_hosts)!r})")

    @property
    def has_token(self) -> bool:
        """Whether a bearer token is configured (it goes to the token hosts only)."""
        return self._token is not None

    @property
    def token_hosts(self) -> frozenset[str]:
        """Hosts that may receive the token (over https; loopback ones over http too)."""
        return frozenset(self._token_hosts)

    def allow_token_host(self, url: str) -> None:
        """Let the host of `url` (an archive's configured base URL, or a host) get the token.

        Raises
        ------
        ValueError
            `url` names no host.
        """
        self._token_hosts.add(normalize_host(url))

    def may_send_token(self, url: str) -> bool:
        """Whether a request to `url` carries the token (:func:`may_send_token`)."""
        return self._token is not None and may_send_token(url, self._token_hosts)

    def redact(self, text: str) -> str:
        """`text` without the token."""
        return redact(text, (self._token,))

    def retry(self, fn: Callable[[int], T], *, what: str) -> T:
        """:func:`retry_call` with this client's policy, sleep, jitter and secrets."""
        return retry_call(fn, what=what, policy=self.policy, sleep=self.sleep, rng=self.rng,
                          secrets=(self._token,))

    # -- single attempts ---------------------------------------------------------------

    def _open(self, url: str, *, what: str, params: Mapping[str, str] | None = None,
              headers: Mapping[str, str] | None = None) -> requests.Response:
        """Send one GET (streamed); map transport failures and statuses to our errors.

        The token is added to this request alone, after :meth:`requests.Session.prepare_request`
        so that the decision reads the very URL that is sent.
        """
        withheld: tuple[str, str] | None = None
        try:
            prepared = self.session.prepare_request(requests.Request(
                "GET", url, params=dict(params or {}), headers=dict(headers or {})))
            prepared.headers.pop("Authorization", None)
            if self._token is not None:
                withheld = _token_refusal(prepared.url or "", self._token_hosts)
                if withheld is None:
                    prepared.headers["Authorization"] = f"Bearer {self._token}"
                elif withheld[0] not in self._withheld:
                    self._withheld.add(withheld[0])
                    logger.info("%s: not sending the bearer token of $XRAI_TCIA_TOKEN to host "
                                "%r: %s (token hosts: %s; more with $%s)", what, withheld[0],
                                withheld[1], ", ".join(sorted(self._token_hosts)),
                                TOKEN_HOSTS_ENV)
            settings = self.session.merge_environment_settings(prepared.url, {}, True, None, None)
            resp = self.session.send(prepared, timeout=self.timeout, allow_redirects=True,
                                     **settings)
        except requests.Timeout as err:
            raise DownloadError(what, self.redact(f"timed out: {err}"), retryable=True) from err
        except requests.RequestException as err:
            raise DownloadError(what, self.redact(f"connection failed: {err}"),
                                retryable=True) from err
        if resp.status_code in (200, 206, 416):
            return resp
        try:
            excerpt = resp.text[:300].strip() if not resp.status_code >= 500 else ""
        except requests.RequestException:
            excerpt = ""
        finally:
            resp.close()
        where = self.redact(resp.url.split("?")[0])
        if resp.status_code in RETRY_STATUSES or resp.status_code >= 500:
            raise TransientStatusError(
                what, f"HTTP {resp.status_code} from {where}",
                retry_after=parse_retry_after(resp.headers.get("Retry-After")))
        if resp.status_code in (401, 403):
            if withheld is not None:
                hint = (f"XRAI_TCIA_TOKEN is set but was not sent to host {withheld[0]!r} "
                        f"({withheld[1]}); if that host is an archive that needs it, use https "
                        f"and list the host in ${TOKEN_HOSTS_ENV}")
            elif self._token:
                hint = "the token in XRAI_TCIA_TOKEN was refused"
            else:
                hint = "if this server needs a token, set XRAI_TCIA_TOKEN"
            raise AccessRefusedError(what, f"HTTP {resp.status_code} (access refused) from {where}; "
                                      f"{hint}", status=resp.status_code)
        detail = f": {self.redact(excerpt)!r}" if excerpt else ""
        error = BadRequestError if resp.status_code == 400 else DownloadError
        raise error(what, f"HTTP {resp.status_code} from {where} with parameters "
                          f"{dict(params or {})!r}{detail}")

    def get_json(self, url: str, params: Mapping[str, str] | None = None, *,
                 what: str) -> Any:
        """GET a JSON document, retried. An empty body reads as ``[]`` (NBIA's "no result")."""

        def attempt(_: int) -> Any:
            with self._open(url, what=what, params=params) as resp:
                try:
                    body = resp.content
                except requests.RequestException as err:
                    raise DownloadError(what, self.redact(f"body cut short: {err}"),
                                        retryable=True) from err
            if not body.strip():
                return []
            try:
                return resp.json()
            except ValueError as err:
                raise DownloadError(what, f"answer from {self.redact(url)} is not JSON: "
                                          f"{body[:120]!r}") from err

        return self.retry(attempt, what=what)

    def get_text(self, url: str, params: Mapping[str, str] | None = None, *, what: str) -> str:
        """GET a text document (UTF-8), retried."""

        def attempt(_: int) -> str:
            with self._open(url, what=what, params=params) as resp:
                try:
                    return resp.content.decode("utf-8")
                except requests.RequestException as err:
                    raise DownloadError(what, self.redact(f"body cut short: {err}"),
                                        retryable=True) from err

        return self.retry(attempt, what=what)

    def download(self, url: str, part: Path, *, what: str,
                 params: Mapping[str, str] | None = None,
                 expected_size: int | None = None, resume: bool = True,
                 progress: Callable[[int], None] | None = None,
                 validate: Callable[[Path], None] | None = None) -> int:
        """Stream `url` into the file `part`, retried and resumed; return its size in bytes.

        Parameters
        ----------
        url : str
        part : Path
            Temporary file; the caller renames it once it is verified.
        what : str
            The series or file, for messages.
        params : mapping, optional
            Query parameters.
        expected_size : int, optional
            Size the body must have; a shorter body is resumed, a longer one rejected.
        resume : bool, default True
            Continue a partial `part` with ``Range: bytes=<n>-``. A server that answers
            200 instead of 206 sends the whole body again, which is then written from
            the start. Off for bodies generated per request (NBIA's zip streams).
        progress : callable, optional
            Called with the number of bytes added (negative when a partial is dropped).
        validate : callable, optional
            Called with `part` once complete; a retryable :class:`DownloadError` it
            raises (a truncated zip, a checksum mismatch) drops the partial and retries.

        Raises
        ------
        DownloadError
            Naming `what`, after the retry cap or on a non-retryable condition.
        """
        tick = progress or (lambda _n: None)
        part.parent.mkdir(parents=True, exist_ok=True)

        def drop() -> None:
            if part.exists():
                tick(-part.stat().st_size)
                part.unlink()

        def attempt(_: int) -> int:
            offset = part.stat().st_size if part.exists() else 0
            if offset and not resume:
                drop()
                offset = 0
            if expected_size is not None and offset > expected_size:
                drop()
                offset = 0
            if expected_size is None or offset < expected_size:
                headers = {"Range": f"bytes={offset}-"} if offset else {}
                with self._open(url, what=what, params=params, headers=headers) as resp:
                    if resp.status_code == 416:
                        drop()
                        raise DownloadError(what, f"server refused the range {offset}- "
                                                  "(starting again)", retryable=True)
                    if resp.status_code == 206:
                        content_range = resp.headers.get("Content-Range", "")
                        if not content_range.startswith(f"bytes {offset}-"):
                            drop()
                            raise DownloadError(what, f"server answered range {offset}- with "
                                                      f"{content_range!r} (starting again)",
                                                retryable=True)
                        mode = "ab"
                    else:
                        if offset:
                            drop()
                        mode = "wb"
                    self._stream(resp, part, mode, what=what, tick=tick)
            size = part.stat().st_size
            if expected_size is not None and size < expected_size:
                raise DownloadError(what, f"body ended after {size} of {expected_size} bytes",
                                    retryable=True)
            if expected_size is not None and size > expected_size:
                drop()
                raise ChecksumError(what, f"received {size} bytes, expected {expected_size}")
            if validate is not None:
                try:
                    validate(part)
                except DownloadError as err:
                    if err.retryable:
                        drop()
                    raise
            return size

        return self.retry(attempt, what=what)

    def _stream(self, resp: requests.Response, part: Path, mode: str, *, what: str,
                tick: Callable[[int], None]) -> None:
        with open(part, mode) as fh:
            try:
                for chunk in resp.iter_content(CHUNK):
                    fh.write(chunk)
                    tick(len(chunk))
            except requests.RequestException as err:
                raise DownloadError(what, self.redact(f"connection lost mid-body: {err}"),
                                    retryable=True) from err
