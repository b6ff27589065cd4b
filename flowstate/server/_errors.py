"""Errors to responses, in one place: JSON ``{"error": {"type", "message"}}``, never a trace.

flowstate errors take the status code :data:`flowstate._wire.ERRORS` gives them; Litestar's
own HTTP errors (bad parameters, unknown routes, bodies over the limit) keep their status
code; anything unexpected is a 500 whose details go to the server's log only.
"""

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import (
    ExceptionHandlersMap,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Send,
)

from flowstate._wire import ErrorBody, ErrorInfo, error_info, error_status
from flowstate.errors import FlowstateError

__all__ = ["EXCEPTION_HANDLERS", "error_response", "not_found", "send_error"]

logger = logging.getLogger("flowstate.server")

# Litestar's HTTP errors by status code: the error type clients see.
_HTTP_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "no_route",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int, info: ErrorInfo, headers: dict[str, str] | None = None
) -> Response[ErrorBody]:
    """The response for an error."""
    return Response(ErrorBody(error=info), status_code=status, headers=headers)


async def send_error(send: Send, status: int, info: ErrorInfo) -> None:
    """Answer with an error from outside the application's routing (raw ASGI)."""
    body = msgspec.json.encode(ErrorBody(error=info))
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(start)
    await send(end)


def not_found(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    """404 for a path no route or file answers."""
    return error_response(404, ErrorInfo(type="no_route", message="nothing is at this path"))


def _where(request: Request[Any, Any, Any]) -> str:
    # The path as a quoted literal: a client cannot start a line of the log with its own text.
    return f"{request.method} {request.url.path!r}"


def _flowstate_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    known = error_status(exc)
    if known is None:
        return _unexpected(request, exc)
    status, type_ = known
    if status >= 500:
        logger.warning("%s: %s", _where(request), exc)
    return error_response(status, error_info(exc, type_))


def _recursion(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    if "deserializ" in str(exc):
        # msgspec decoding a body nested deeper than the interpreter's recursion limit.
        return error_response(
            400, ErrorInfo(type="bad_request", message="the JSON body is nested too deeply")
        )
    return _unexpected(request, exc)


def _http_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    assert isinstance(exc, HTTPException)
    cause = _flowstate_cause(exc)
    if cause is not None:
        # A body's struct refused a value as the library does (StatesQuery(limit=0)): the
        # error is the library's, as it is when a route builds the struct itself.
        return _flowstate_error(request, cause)
    message = exc.detail
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list):
        details = [
            f"{item['key']}: {item.get('message', 'invalid')}"
            if "key" in item
            else str(item.get("message", "invalid"))
            for item in exc.extra
            if isinstance(item, dict)
        ]
        if details:
            message = f"{message}: {'; '.join(details)}"
    type_ = _HTTP_TYPES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, ErrorInfo(type=type_, message=message), exc.headers)


def _flowstate_cause(exc: BaseException) -> FlowstateError | None:
    """The flowstate error a decoding error stands for: msgspec chains the error a struct's
    ``__post_init__`` raised, and Litestar chains msgspec's."""
    seen: set[int] = set()
    cause = exc.__cause__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, FlowstateError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__
    return None


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    # The trace is for the operator's log; the client learns only that it was not its fault.
    logger.error("%s failed", _where(request), exc_info=exc)
    return error_response(
        500, ErrorInfo(type="internal", message="internal server error; see the server's log")
    )


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    FlowstateError: _flowstate_error,
    HTTPException: _http_error,
    RecursionError: _recursion,
    Exception: _flowstate_error,
}
