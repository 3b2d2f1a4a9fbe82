"""Fetching pages for web search, without becoming a way into the network.

Every hop of every fetch is checked: the scheme is http or https, the host
resolves, and the address the connection is actually made to is public. An
address that is loopback, private, link-local, multicast, reserved or
otherwise not global is refused unless ``SHM_EMBED_FETCH_ALLOW`` lists it.
The check happens inside the connection (a network backend of httpcore that
resolves, checks and connects to the checked address), so a name that
resolves to a public address once and a private one the next time (DNS
rebinding) cannot slip through. Redirects are followed by hand, at most
``SHM_EMBED_FETCH_MAX_REDIRECTS``, each re-checked; bodies are read up to
``SHM_EMBED_FETCH_MAX_BYTES``; only HTML and plain text are read.
"""

from __future__ import annotations

import ipaddress
import socket
import time
import zlib
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpcore

from shm_protocol import __version__
from shm_protocol.errors import FetchFailed, FetchRefused

TEXT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")
REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = f"shm-embed/{__version__} (web search)"


class AddressPolicy:
    """Which addresses the fetcher may connect to."""

    def __init__(self, allow: str = ""):
        self.allow = []
        for item in filter(None, (a.strip() for a in allow.split(","))):
            try:
                self.allow.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise FetchRefused(f"SHM_EMBED_FETCH_ALLOW: {item!r} is not an address or network") from None

    def refusal(self, address: str) -> str | None:
        """Why ``address`` is refused ('a private address'...), or None when it may be reached."""
        ip = ipaddress.ip_address(address.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allow):
            return None
        for attr, what in (("is_unspecified", "an unspecified"), ("is_loopback", "a loopback"), ("is_link_local", "a link-local"),
                           ("is_private", "a private"), ("is_multicast", "a multicast"),
                           ("is_reserved", "a reserved")):
            if getattr(ip, attr):
                return f"{what} address"
        if not ip.is_global:
            return "not a public address"
        return None

    def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of ``host`` that may be reached; FetchRefused when
        none may, FetchFailed when the name does not resolve."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise FetchFailed(f"cannot resolve {host}: {exc}") from None
        allowed, refused = [], []
        for info in infos:
            addr = info[4][0]
            why = self.refusal(addr)
            if why:
                refused.append(f"{addr} is {why}" if addr == host else f"{host} resolves to {addr}, {why}")
            else:
                allowed.append(addr)
        if not allowed:
            raise FetchRefused(f"refused: {refused[0]} (SHM_EMBED_FETCH_ALLOW can allow it)")
        return list(dict.fromkeys(allowed))


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's network backend, connecting only to addresses the policy allows."""

    def __init__(self, policy: AddressPolicy):
        self.policy = policy

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        last: Exception | None = None
        for address in self.policy.resolve(host, port):
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        raise last if last is not None else FetchFailed(f"cannot connect to {host}")


@dataclass
class Page:
    url: str
    final_url: str
    content_type: str
    charset: str | None
    body: bytes
    truncated: bool


class Fetcher:
    """Fetches pages with the limits of the settings; thread-safe."""

    def __init__(self, settings):
        self.settings = settings
        self.policy = AddressPolicy(settings.fetch_allow)
        self.pool = httpcore.ConnectionPool(network_backend=GuardedBackend(self.policy), max_connections=32,
                                            retries=0)

    def close(self) -> None:
        self.pool.close()

    def fetch(self, url: str, deadline: float | None = None) -> Page:
        """The page at ``url`` (redirects followed); FetchRefused or FetchFailed say why not."""
        s = self.settings
        asked = url
        for _ in range(s.fetch_max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise FetchRefused(f"refused: {url!r} is not an http or https URL")
            try:
                page = self._get(url, deadline)
            except httpcore.TimeoutException:
                raise FetchFailed(f"timed out after {s.fetch_timeout_s:g} s") from None
            except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError) as exc:
                raise FetchFailed(f"connection failed: {exc or type(exc).__name__}") from None
            if isinstance(page, str):  # a redirect's target
                url = urljoin(url, page)
                continue
            page.url = asked
            return page
        raise FetchFailed(f"more than {s.fetch_max_redirects} redirects (SHM_EMBED_FETCH_MAX_REDIRECTS)")

    def _get(self, url: str, deadline: float | None) -> Page | str:
        s = self.settings
        t = s.fetch_timeout_s
        headers = [(b"User-Agent", USER_AGENT.encode()), (b"Accept", b"text/html,application/xhtml+xml,text/plain"),
                   (b"Accept-Encoding", b"gzip, deflate")]
        ext = {"timeout": {"connect": t, "read": t, "write": t, "pool": t}}
        with self.pool.stream("GET", url, headers=headers, extensions=ext) as resp:
            head = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in resp.headers}
            if resp.status in REDIRECTS:
                if "location" not in head:
                    raise FetchFailed(f"HTTP {resp.status} without a Location")
                return head["location"]
            if resp.status != 200:
                raise FetchFailed(f"HTTP {resp.status}")
            ctype, _, params = head.get("content-type", "").partition(";")
            ctype = ctype.strip().lower()
            if ctype not in TEXT_TYPES:
                raise FetchFailed(f"content type {ctype or 'missing'} is not HTML or text")
            charset = None
            for p in params.split(";"):
                k, _, v = p.partition("=")
                if k.strip().lower() == "charset":
                    charset = v.strip().strip('"') or None
            encoding = head.get("content-encoding", "identity").strip().lower()
            if encoding not in ("identity", "gzip", "deflate", ""):
                raise FetchFailed(f"content encoding {encoding} is not supported")
            inflate = zlib.decompressobj(47) if encoding in ("gzip", "deflate") else None  # 47: gzip or zlib
            body, truncated = bytearray(), False
            for chunk in resp.iter_stream():
                if inflate is not None:
                    chunk = inflate.decompress(chunk, s.fetch_max_bytes + 1 - len(body))
                body += chunk
                if len(body) > s.fetch_max_bytes:
                    del body[s.fetch_max_bytes:]
                    truncated = True
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise FetchFailed(f"still reading when the search's {s.fetch_total_s:g} s were up")
        return Page(url, url, ctype, charset, bytes(body), truncated)
