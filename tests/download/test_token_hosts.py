"""Issue 11, item 9: the bearer token goes to the configured archive hosts only, over https.

Loopback servers record the headers they receive; requests to other hosts go through a
recording :mod:`requests` adapter, so nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from pipeline.download.filelist import FileListFetcher, plan_filelist
from pipeline.download.http import (
    LOOPBACK_HOSTS,
    TOKEN_HOSTS_ENV,
    AccessRefusedError,
    HttpClient,
    RetryPolicy,
    may_send_token,
    normalize_host,
)
from pipeline.download.nbia import DEFAULT_NBIA_URL, NbiaClient

SECRET = "s3cr3t-token-issue11"
ARCHIVE = "services.cancerimagingarchive.net"  # the host of DEFAULT_NBIA_URL
FAST = RetryPolicy(max_attempts=1)


@pytest.fixture(autouse=True)
def _no_env_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_HOSTS_ENV, raising=False)


# -- a loopback server that records headers and redirects on request -----------------------

class _RecordingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        parsed = urlparse(self.path)
        self.server.log.append((parsed.path, dict(self.headers)))  # type: ignore[attr-defined]
        target = parse_qs(parsed.query).get("to")
        if parsed.path == "/redirect" and target:
            self.send_response(302)
            self.send_header("Location", target[0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class RecordingServer:
    """A ThreadingHTTPServer on 127.0.0.1; ``log`` holds ``(path, headers)`` per request."""

    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
        self.httpd.daemon_threads = True
        self.httpd.log = []  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def log(self) -> list[tuple[str, dict[str, str]]]:
        return self.httpd.log  # type: ignore[attr-defined]

    def __enter__(self) -> RecordingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    with RecordingServer() as srv:
        yield srv


@pytest.fixture
def other_server() -> Iterator[RecordingServer]:
    with RecordingServer() as srv:
        yield srv


# -- a requests adapter standing in for hosts on the internet ----------------------------

class RecordingAdapter(BaseAdapter):
    """Answers every request itself and records ``(url, headers)``; no network."""

    def __init__(self, bodies: dict[str, bytes] | None = None, status: int = 200) -> None:
        super().__init__()
        self.bodies = bodies or {}
        self.status = status
        self.sent: list[tuple[str, dict[str, str]]] = []

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: object = None, verify: object = True, cert: object = None,
             proxies: object = None) -> requests.Response:
        url = request.url or ""
        self.sent.append((url, dict(request.headers)))
        body = self.bodies.get(url, b"ok")
        resp = requests.Response()
        resp.status_code = self.status
        resp.headers = CaseInsensitiveDict({"Content-Length": str(len(body))})
        resp.raw = io.BytesIO(body)
        resp._content = body
        resp._content_consumed = True
        resp.url = url
        resp.request = request
        return resp

    def close(self) -> None:
        pass


def adapted_client(adapter: RecordingAdapter, **kwargs: object) -> HttpClient:
    session = requests.Session()
    session.trust_env = False
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return HttpClient(token=SECRET, policy=FAST, session=session, **kwargs)  # type: ignore[arg-type]


def authorization(headers: dict[str, str]) -> str | None:
    return {k.lower(): v for k, v in headers.items()}.get("authorization")


# -- the decision --------------------------------------------------------------------------

class TestMaySendToken:
    HOSTS = frozenset({ARCHIVE, *LOOPBACK_HOSTS})

    @pytest.mark.parametrize("url", [
        f"https://{ARCHIVE}/nbia-api/services/v4/getSeries?Collection=X",
        f"https://{ARCHIVE}:443/nbia-api",
        f"HTTPS://{ARCHIVE.upper()}./nbia-api",
        "http://127.0.0.1:8000/list.csv",
        "https://127.0.0.1:8443/list.csv",
        "http://localhost:8000/a",
        "http://[::1]:8000/a",
    ])
    def test_issue11_allowed(self, url: str) -> None:
        assert may_send_token(url, self.HOSTS)

    @pytest.mark.parametrize("url", [
        f"http://{ARCHIVE}/nbia-api",                           # an archive host, plain http
        "https://mirror.example.org/data/a.nii.gz",             # a host only a file list names
        f"https://evil-{ARCHIVE}/x",                            # no suffix match
        f"https://{ARCHIVE}.evil.example/x",                    # no prefix match
        f"https://sub.{ARCHIVE}/x",                             # no subdomain match
        f"https://{ARCHIVE}@evil.example/x",                    # userinfo that looks like the host
        f"https://evil.example\\@{ARCHIVE}/x",                  # parsers disagree on the host
        f"https://evil.example#@{ARCHIVE}/x",
        f"ftp://{ARCHIVE}/x",
        "http://127.0.0.2/x",                                   # loopback, but not listed
        "not a url",
    ])
    def test_issue11_withheld(self, url: str) -> None:
        assert not may_send_token(url, self.HOSTS)

    def test_loopback_needs_to_be_listed(self) -> None:
        assert not may_send_token("http://127.0.0.1:8000/a", {ARCHIVE})

    @pytest.mark.parametrize(("value", "host"), [
        (DEFAULT_NBIA_URL, ARCHIVE),
        ("Mirror.Example.org", "mirror.example.org"),
        ("mirror.example.org:8443", "mirror.example.org"),
        ("[::1]:80", "::1"),
    ])
    def test_normalize_host(self, value: str, host: str) -> None:
        assert normalize_host(value) == host

    def test_normalize_host_rejects_no_host(self) -> None:
        with pytest.raises(ValueError, match=r"'https://' names no host"):
            normalize_host("https://")


class TestConfiguredHosts:
    def test_default_is_loopback_and_the_archive_clients_add_theirs(self) -> None:
        http = HttpClient(token=SECRET)
        assert http.token_hosts == LOOPBACK_HOSTS
        NbiaClient(http)  # TCIA's public server by default
        assert http.token_hosts == LOOPBACK_HOSTS | {ARCHIVE}
        assert http.may_send_token(f"https://{ARCHIVE}/nbia-api/services/v4/getSeries")
        assert not http.may_send_token(f"http://{ARCHIVE}/nbia-api/services/v4/getSeries")

    def test_env_var_adds_hosts(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(TOKEN_HOSTS_ENV, " Mirror.Example.org , https://files.example.org:8443/x,")
        http = HttpClient(token=SECRET)
        assert http.token_hosts == LOOPBACK_HOSTS | {"mirror.example.org", "files.example.org"}

    def test_env_var_entry_without_host_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(TOKEN_HOSTS_ENV, "mirror.example.org,https://")
        with pytest.raises(ValueError, match=r"XRAI_TOKEN_HOSTS: entry 'https://'"):
            HttpClient(token=SECRET)

    def test_constructor_argument_replaces_the_default(self) -> None:
        http = HttpClient(token=SECRET, token_hosts=["https://Mirror.Example.org/root"])
        assert http.token_hosts == {"mirror.example.org"}
        assert not http.may_send_token("http://127.0.0.1:8000/a")

    def test_no_token_no_decision(self) -> None:
        assert not HttpClient().may_send_token("http://127.0.0.1:8000/a")

    def test_token_is_never_a_session_header_nor_in_the_repr(self) -> None:
        session = requests.Session()
        session.headers["Authorization"] = "Bearer left-over"
        http = HttpClient(token=SECRET, session=session)
        assert "Authorization" not in http.session.headers
        assert SECRET not in repr(http)


# -- what is sent --------------------------------------------------------------------------

class TestSent:
    def test_issue11_token_sent_to_an_allowed_loopback_host(self, server: RecordingServer) -> None:
        http = HttpClient(token=SECRET, policy=FAST, timeout=2.0)
        assert http.get_text(f"http://127.0.0.1:{server.port}/a", what="a") == "hello"
        assert [authorization(h) for _, h in server.log] == [f"Bearer {SECRET}"]

    def test_issue11_token_not_sent_to_a_loopback_host_not_listed(
            self, server: RecordingServer) -> None:
        http = HttpClient(token=SECRET, policy=FAST, timeout=2.0, token_hosts=[ARCHIVE])
        http.get_text(f"http://127.0.0.1:{server.port}/a", what="a")
        assert [authorization(h) for _, h in server.log] == [None]

    def test_issue11_foreign_host_and_plain_http_get_no_token(
            self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG)
        adapter = RecordingAdapter()
        http = adapted_client(adapter)
        NbiaClient(http)
        for url in (f"https://{ARCHIVE}/nbia-api/services/v4/getCollectionValues",
                    "https://mirror.example.org/a.nii.gz",
                    "https://mirror.example.org/b.nii.gz",
                    f"http://{ARCHIVE}/nbia-api/services/v4/getCollectionValues"):
            http.get_text(url, what="t")
        assert [authorization(h) for _, h in adapter.sent] == [f"Bearer {SECRET}", None, None,
                                                               None]
        withheld = [r.getMessage() for r in caplog.records if "not sending" in r.getMessage()]
        # once per host: mirror.example.org (not an archive), the archive host over http
        assert len(withheld) == 2
        assert "'mirror.example.org': not a configured archive host" in withheld[0]
        assert f"{ARCHIVE!r}: http scheme" in withheld[1]
        assert SECRET not in caplog.text

    def test_issue11_refusal_by_a_withheld_host_says_why(self) -> None:
        http = adapted_client(RecordingAdapter(status=401))
        with pytest.raises(AccessRefusedError, match=r"was not sent to host 'mirror\.example\.org'"
                                                     r".*XRAI_TOKEN_HOSTS") as info:
            http.get_text("https://mirror.example.org/a", what="a")
        assert SECRET not in str(info.value)

    def test_issue11_file_list_urls_on_other_hosts_get_no_token(self, tmp_path: Path) -> None:
        data = b"volume bytes"
        digest = hashlib.sha256(data).hexdigest()
        listed = "https://elsewhere.example/UCSF-PDGM/P1/t1.nii.gz"
        on_archive = "https://mirror.example.org/UCSF-PDGM/P1/t2.nii.gz"
        file_list = tmp_path / "files.csv"
        file_list.write_text(f"path,sha256,url\nP1/t1.nii.gz,{digest},{listed}\n"
                             f"P1/t2.nii.gz,{digest},{on_archive}\n")
        adapter = RecordingAdapter({listed: data, on_archive: data})
        http = adapted_client(adapter)
        http.allow_token_host("https://mirror.example.org/UCSF-PDGM")  # as --base-url does
        plan = plan_filelist("UCSF-PDGM", str(file_list), http=http)
        fetcher = FileListFetcher(http)
        for item in plan.items:
            fetcher.fetch(item, tmp_path / "dest", lambda _n: None)
        assert {url: authorization(h) for url, h in adapter.sent} == {
            listed: None, on_archive: f"Bearer {SECRET}"}


class TestRedirects:
    def test_issue11_redirect_to_another_host_drops_the_token(
            self, server: RecordingServer, other_server: RecordingServer) -> None:
        # 127.0.0.1 may get the token; the redirect target "localhost" is not listed (and
        # requests drops Authorization whenever a redirect changes host, scheme or port)
        http = HttpClient(token=SECRET, policy=FAST, timeout=2.0, token_hosts=["127.0.0.1"])
        target = f"http://localhost:{other_server.port}/landing"
        text = http.get_text(f"http://127.0.0.1:{server.port}/redirect",
                             params={"to": target}, what="r")
        assert text == "hello"
        assert [(p, authorization(h)) for p, h in server.log] == [("/redirect",
                                                                   f"Bearer {SECRET}")]
        assert [(p, authorization(h)) for p, h in other_server.log] == [("/landing", None)]

    def test_redirect_on_the_same_host_and_port_keeps_it(self, server: RecordingServer) -> None:
        # the control of the test above: the header would be seen if it were forwarded
        http = HttpClient(token=SECRET, policy=FAST, timeout=2.0, token_hosts=["127.0.0.1"])
        target = f"http://127.0.0.1:{server.port}/landing"
        http.get_text(f"http://127.0.0.1:{server.port}/redirect", params={"to": target},
                      what="r")
        assert [(p, authorization(h)) for p, h in server.log] == [
            ("/redirect", f"Bearer {SECRET}"), ("/landing", f"Bearer {SECRET}")]
