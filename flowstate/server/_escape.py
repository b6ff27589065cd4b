"""Path segments that may hold ``/``: state ids such as ``orders/42`` in ``/api/v1/states/{id}``.

ASGI servers hand applications the *decoded* path, where ``a%2Fb`` has become ``a/b`` and no
router can tell the id's slash from a separator. :func:`route_path` rebuilds the path from the
raw one, decoding each segment but writing ``%`` and ``/`` inside it as ``%25`` and ``%2F``;
route handlers undo that with :func:`unescape`.

Paths and query strings are UTF-8 once percent-decoded; one that is not (``%ED%A0%80``, an
encoded lone surrogate) is refused rather than read with replacement characters, which would
name a different state than the client meant. A query names each parameter once, but for
``label`` (repeated, each one more label to match): of ``?id=a&id=b``, taking one value would
answer a question the client did not ask.
"""

from urllib.parse import parse_qsl, unquote_to_bytes

__all__ = ["REPEATABLE", "QueryError", "check_query", "route_path", "unescape"]

#: The query parameters a request may give more than once.
REPEATABLE = frozenset({"label"})


class QueryError(ValueError):
    """A query string names a parameter more than once."""


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
    """Check that a query string is UTF-8 once percent-decoded and names each parameter once
    (but those in :data:`REPEATABLE`).

    Raises:
        UnicodeDecodeError: It is not UTF-8.
        QueryError: A parameter is given twice.
    """
    if not query_string:
        return
    unquote_to_bytes(query_string.replace(b"+", b" ")).decode("utf-8")
    seen: set[str] = set()
    for key, _ in parse_qsl(
        query_string.decode("utf-8", "surrogateescape"), keep_blank_values=True
    ):
        if key in seen and key not in REPEATABLE:
            raise QueryError(f"the query parameter {key!r} is given more than once")
        seen.add(key)


def unescape(segment: str) -> str:
    """A path parameter as the client meant it (see :func:`route_path`)."""
    if "%" not in segment:
        return segment
    return segment.replace("%2F", "/").replace("%25", "%")
