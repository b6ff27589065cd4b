"""Path segments that may hold ``/``: state ids such as ``orders/42`` in ``/api/v1/states/{id}``.

ASGI servers hand applications the *decoded* path, where ``a%2Fb`` has become ``a/b`` and no
router can tell the id's slash from a separator. :func:`route_path` rebuilds the path from the
raw one, decoding each segment but writing ``%`` and ``/`` inside it as ``%25`` and ``%2F``;
route handlers undo that with :func:`unescape`.

Paths and query strings are UTF-8 once percent-decoded; one that is not (``%ED%A0%80``, an
encoded lone surrogate) is refused rather than read with replacement characters, which would
name a different state than the client meant.
"""

from urllib.parse import unquote_to_bytes

__all__ = ["check_query", "route_path", "unescape"]


def route_path(raw_path: bytes) -> str:
    """The path to route on: segments decoded, with ``%`` and ``/`` inside them escaped.

    Raises:
        UnicodeDecodeError: A segment is not UTF-8 once percent-decoded.
    """
    if b"%" not in raw_path:
        return raw_path.decode("utf-8")
    return "/".join(
        unquote_to_bytes(segment).decode("utf-8").replace("%", "%25").replace("/", "%2F")
        for segment in raw_path.split(b"/")
    )


def check_query(query_string: bytes) -> None:
    """Check that a query string is UTF-8 once percent-decoded.

    Raises:
        UnicodeDecodeError: It is not.
    """
    if query_string:
        unquote_to_bytes(query_string.replace(b"+", b" ")).decode("utf-8")


def unescape(segment: str) -> str:
    """A path parameter as the client meant it (see :func:`route_path`)."""
    if "%" not in segment:
        return segment
    return segment.replace("%2F", "/").replace("%25", "%")
