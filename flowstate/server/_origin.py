"""What keeps web pages away from a server without a token: its Host and Origin rules.

Without a token the server listens on loopback only, yet the browsers of its own machine
reach it, and so do the pages they show. Two rules keep those pages out:

* **Host.** A page of a name its site rebinds to 127.0.0.1 (DNS rebinding) reads the server
  as its own site, but its requests still name that site in ``Host``. So the server answers
  only requests addressed to a loopback name: ``127.0.0.1`` (any 127.x.y.z), ``[::1]`` or
  ``localhost``, with any port or none. Any other name is refused with 421 Misdirected
  Request, the status RFC 9110 gives a request the server will not answer for its target's
  name: the request itself is well formed (a 400 would say otherwise), and a client may
  retry it at the right name.
* **Origin.** A page of any site may send a cross-site POST without asking first (a form's
  ``text/plain`` or ``application/x-www-form-urlencoded`` body needs no CORS preflight);
  browsers send the page's ``Origin`` with it. A request that changes something (any method
  but GET, HEAD, OPTIONS and TRACE) carrying an ``Origin`` other than the server's own
  (its scheme, and the name and port of ``Host``) is refused with 403. The console's own
  requests carry the server's origin; the remote driver and other programs send none.

With a token neither rule applies: a page cannot send the token it does not know, nor the
``Authorization`` header to another site without the preflight that the server never
grants, and a server reached through a proxy may be named anything.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from flowstate._wire import ErrorInfo

if TYPE_CHECKING:
    from litestar.types import HTTPScope

__all__ = ["SAFE_METHODS", "loopback_authority", "refusal"]

#: The methods that change nothing (RFC 9110, 9.2.1): they may come from any origin.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

_DEFAULT_PORTS = {"http": 80, "https": 443}


def loopback_authority(host: str) -> tuple[str, int | None] | None:
    """The name and port of a ``Host`` value that names a loopback address (``127.0.0.1``,
    ``[::1]``, ``localhost``, with or without a port), or None for any other value."""
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket:
            return None
        try:
            loopback = ipaddress.IPv6Address(name).is_loopback
        except ValueError:
            return None
    else:
        name, colon, port_text = host.partition(":")
        rest = colon + port_text
        name = name.lower()
        if name == "localhost":
            loopback = True
        else:
            try:
                loopback = ipaddress.IPv4Address(name).is_loopback
            except ValueError:
                return None
    if not loopback:
        return None
    if not rest:
        return name, None
    port_text = rest.removeprefix(":")
    if not rest.startswith(":") or not port_text.isascii() or not port_text.isdigit():
        return None
    port = int(port_text)
    return (name, port) if port <= 65535 else None


def refusal(scope: HTTPScope) -> tuple[int, ErrorInfo] | None:
    """Why a server without a token refuses this request (its status and error), if it
    does: a Host that is not a loopback name, or an Origin not its own on a request that
    changes something."""
    hosts = [value for name, value in scope["headers"] if name == b"host"]
    if len(hosts) != 1:
        count = "no" if not hosts else "more than one"
        return 400, ErrorInfo(type="bad_request", message=f"the request has {count} Host header")
    host = hosts[0].decode("latin-1")
    authority = loopback_authority(host)
    if authority is None:
        message = (
            f"this server answers for 127.0.0.1, [::1] and localhost only, not {host!r}: "
            "without a token it serves no other name"
        )
        return 421, ErrorInfo(type="misdirected_request", message=message)
    if scope["method"] in SAFE_METHODS:
        return None
    origins = [value for name, value in scope["headers"] if name == b"origin"]
    if not origins:
        return None
    scheme = scope["scheme"]
    name, port = authority
    own = (scheme, name, port or _DEFAULT_PORTS.get(scheme))
    origin = b", ".join(origins).decode("latin-1")
    if len(origins) == 1 and _origin(origin) == own:
        return None
    message = (
        f"a page of {origin!r} may not change this server's store: without a token, only "
        "the server's own pages may"
    )
    return 403, ErrorInfo(type="forbidden", message=message)


def _origin(value: str) -> tuple[str, str, int | None] | None:
    """An ``Origin`` header's scheme, host and port (the scheme's default when it names
    none), or None for ``null`` and anything that is not an origin."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if not parts.hostname or parts.path or parts.query or parts.fragment or parts.username:
        return None
    return scheme, parts.hostname, port or _DEFAULT_PORTS.get(scheme)
