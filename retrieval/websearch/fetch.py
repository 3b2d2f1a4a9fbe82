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

An address is judged by where it leads: an IPv4-mapped or NAT64 address by
its IPv4 address; 6to4 (2002::/16) and Teredo (2001::/32) addresses, which
tunnel to an IPv4 address of the sender's choosing (private ones included),
and IPv4-compatible ones (::a.b.c.d) are refused outright. A refusal of a
name says no more than that: the addresses it resolved to go to the log only
(quoting them made the service a DNS oracle of the internal network).

Every fetch has a deadline (``SHM_EMBED_FETCH_DEADLINE_S``, within the
search's ``SHM_EMBED_FETCH_TOTAL_S``) that bounds every wait on its
connection (connect, TLS, the request, the headers, the body): a server that
trickles its headers a byte at a time (each within the per-read timeout) gets
its connection closed at the deadline, and the fetch's thread is free again.
Abandoning such a fetch instead kept the thread and the connection for as
long as the server kept sending, and a few such searches used up the pool.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpcore
from loguru import logger

from shm_protocol import __version__

from ..errors import FetchFailed, FetchRefused

TEXT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")
REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = f"shm-embed/{__version__} (web search)"

#: NAT64's well-known prefix: the last 32 bits are the IPv4 address the translator connects to.
NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: IPv4-compatible addresses (deprecated): ::a.b.c.d, which some stacks still route to a.b.c.d.
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
#: Tunnels and local translation whose far end the address does not show plainly.
REFUSED_V6 = ((ipaddress.ip_network("2002::/16"), "a 6to4 address"),
              (ipaddress.ip_network("2001::/32"), "a Teredo address"),
              (ipaddress.ip_network("64:ff9b:1::/48"), "a local-use NAT64 address"))

_deadline = threading.local()


@contextmanager
def fetch_deadline(at: float):
    """Every network wait of this thread ends by ``at`` (time.monotonic()) while inside.
    A connection serves one request at a time, in the thread that sent it, so
    the deadline of the thread is the deadline of the fetch using the connection."""
    before = getattr(_deadline, "at", None)
    _deadline.at = at if before is None else min(at, before)
    try:
        yield
    finally:
        _deadline.at = before


def _bounded(timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout`` cut to what is left of this thread's deadline; ``error`` when nothing is."""
    at = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise error("the fetch's deadline has passed")
    return left if timeout is None else min(timeout, left)


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
        given = ip = ipaddress.ip_address(address.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            elif ip in NAT64:  # judged by the IPv4 address the translator reaches
                ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if any(a in net for net in self.allow for a in (given, ip)):
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            for net, what in REFUSED_V6:
                if ip in net:
                    return what
            if ip in IPV4_COMPATIBLE and not (ip.is_unspecified or ip.is_loopback):
                return "an IPv4-compatible address"
        for attr, what in (("is_unspecified", "an unspecified"), ("is_loopback", "a loopback"),
                           ("is_link_local", "a link-local"), ("is_private", "a private"),
                           ("is_multicast", "a multicast"), ("is_reserved", "a reserved")):
            if getattr(ip, attr):
                return f"{what} address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:  # fec0::/10 counts as global in Python
            return "a site-local address"
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
                refused.append((addr, why))
            else:
                allowed.append(addr)
        if not allowed:
            addr, why = refused[0]
            if _is_address(host):  # an address the client wrote itself: naming it tells nothing new
                raise FetchRefused(f"refused: {addr} is {why} (SHM_EMBED_FETCH_ALLOW can allow it)")
            logger.info("fetch refused: {} resolves to {}", host, ", ".join(f"{a} ({w})" for a, w in refused))
            raise FetchRefused(f"refused: {host} resolves to no public address (SHM_EMBED_FETCH_ALLOW can allow it)")
        return list(dict.fromkeys(allowed))


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return False
    return True


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose every wait ends by the deadline of the fetch using it
    (see :func:`fetch_deadline`). When it passes, the wait raises; httpcore then
    closes the connection, since its response was not read to the end."""

    def __init__(self, stream: httpcore.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        # The handshake is one wait: Python's ssl module bounds all of it by the socket's timeout.
        return DeadlineStream(self._stream.start_tls(ssl_context, server_hostname,
                                                     _bounded(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class DeadlineBackend(httpcore.SyncBackend):
    """httpcore's network backend, its connections bounded by this thread's deadline."""

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        stream = super().connect_tcp(host, port, _bounded(timeout, httpcore.ConnectTimeout), local_address,
                                     socket_options)
        return DeadlineStream(stream)


class GuardedBackend(DeadlineBackend):
    """The deadline backend, connecting only to addresses the policy allows."""

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
        """The page at ``url`` (redirects followed), by SHM_EMBED_FETCH_DEADLINE_S
        from now or by ``deadline`` (the search's), whichever is first;
        FetchRefused or FetchFailed say why not."""
        settings = self.settings
        own = time.monotonic() + settings.fetch_deadline_s
        at = own if deadline is None else min(own, deadline)
        asked = url
        with fetch_deadline(at):
            for _ in range(settings.fetch_max_redirects + 1):
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise FetchRefused(f"refused: {url!r} is not an http or https URL")
                try:
                    page = self._get(url, at)
                except httpcore.TimeoutException:
                    if time.monotonic() < at - 0.01:
                        raise FetchFailed(f"timed out after {settings.fetch_timeout_s:g} s") from None
                    if at < own:
                        raise FetchFailed(f"timed out: still fetching when the search's {settings.fetch_total_s:g} s "
                                          "were up") from None
                    raise FetchFailed(f"timed out: not fetched within {settings.fetch_deadline_s:g} s "
                                      "(SHM_EMBED_FETCH_DEADLINE_S)") from None
                except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol,
                        OSError) as exc:
                    raise FetchFailed(f"connection failed: {exc or type(exc).__name__}") from None
                if isinstance(page, str):  # a redirect's target
                    url = urljoin(url, page)
                    continue
                page.url = asked
                return page
        raise FetchFailed(f"more than {settings.fetch_max_redirects} redirects (SHM_EMBED_FETCH_MAX_REDIRECTS)")

    def _get(self, url: str, at: float) -> Page | str:
        settings = self.settings
        timeout = max(0.001, min(settings.fetch_timeout_s, at - time.monotonic()))  # the pool wait too
        headers = [(b"User-Agent", USER_AGENT.encode()), (b"Accept", b"text/html,application/xhtml+xml,text/plain"),
                   (b"Accept-Encoding", b"gzip, deflate")]
        ext = {"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}}
        with self.pool.stream("GET", url, headers=headers, extensions=ext) as resp:
            head = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in resp.headers}
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
            for param in params.split(";"):
                key, _, value = param.partition("=")
                if key.strip().lower() == "charset":
                    charset = value.strip().strip('"') or None
            encoding = head.get("content-encoding", "identity").strip().lower()
            if encoding not in ("identity", "gzip", "deflate", ""):
                raise FetchFailed(f"content encoding {encoding} is not supported")
            inflate = zlib.decompressobj(47) if encoding in ("gzip", "deflate") else None  # 47: gzip or zlib
            body, truncated = bytearray(), False
            for chunk in resp.iter_stream():
                if inflate is not None:
                    chunk = inflate.decompress(chunk, settings.fetch_max_bytes + 1 - len(body))
                body += chunk
                if len(body) > settings.fetch_max_bytes:
                    del body[settings.fetch_max_bytes:]
                    truncated = True
                    break
        return Page(url, url, ctype, charset, bytes(body), truncated)
