"""The console: the page at ``/`` and its files under ``/console/``.

The console is static: HTML, CSS and JavaScript modules in ``flowstate/server/console/``,
served as they are (no templates, no build step), read from disk on each request. Loading
it needs no token; the page asks for the token itself and sends it with every API call, as
any other client of the public API does. Its responses forbid everything the page does not
use (a Content-Security-Policy allowing only this server's own scripts, styles and API), so
that a state's labels or annotations can never run as code in it.
"""

from pathlib import Path
from typing import Any

from litestar import Response, Router, get
from litestar.enums import MediaType
from litestar.response import File
from litestar.static_files import create_static_files_router

from flowstate.server._errors import not_found

__all__ = ["CONSOLE_DIR", "SECURITY_HEADERS", "router"]

#: The console's files.
CONSOLE_DIR = Path(__file__).with_name("console")

#: Sent with the page and its files.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate on each load, so that a changed file shows after a reload.
    "Cache-Control": "no-cache",
}


async def _secure(response: Response[Any]) -> Response[Any]:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


def router() -> Router:
    """``GET /`` (the page) and ``GET /console/{file}`` (its scripts, styles and icon)."""

    @get("/", opt={"public": True}, include_in_schema=False, after_request=_secure)
    async def page() -> File:
        """The console's page; it asks for the token when the server needs one."""
        return File(
            CONSOLE_DIR / "index.html",
            content_disposition_type="inline",
            media_type=MediaType.HTML,
        )

    files = create_static_files_router(
        path="/console",
        directories=[CONSOLE_DIR],
        name="console",
        opt={"public": True},
        after_request=_secure,
        include_in_schema=False,
        # A path no file can have (one holding a NUL) fails the file lookup with ValueError.
        exception_handlers={ValueError: not_found},
    )
    return Router(path="/", route_handlers=[page, files])
