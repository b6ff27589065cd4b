"""Path segments that may hold ``/``: state ids such as ``orders/42`` in ``/api/v1/states/{id}``.

ASGI servers hand applications the *decoded* path, where ``a%2Fb`` has become ``a/b`` and no
router can tell the id's slash from a separator. :func:`route_path` rebuilds the path from the
raw one, decoding each segment but writing ``%`` and ``/`` inside it as ``%25`` and ``%2F``;
route handlers undo that with :func:`unescape`.
"""

from urllib.parse import unquote

__all__ = ["route_path", "unescape"]


def route_path(raw_path: bytes) -> str:
    """The path to route on: segments decoded, with ``%`` and ``/`` inside them escaped."""
    text = raw_path.decode("latin-1")
    if "%" not in text:
        return text
    return "/".join(
        unquote(segment).replace("%", "%25").replace("/", "%2F") for segment in text.split("/")
    )


def unescape(segment: str) -> str:
    """A path parameter as the client meant it (see :func:`route_path`)."""
    if "%" not in segment:
        return segment
    return segment.replace("%2F", "/").replace("%25", "%")
