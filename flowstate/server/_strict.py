"""Requests are read strictly: a body only as JSON, and only the fields and query parameters
a route knows.

msgspec structs skip fields they do not have, and Litestar skips query parameters no handler
argument names. Both are right for stored data read back by newer code, and wrong at the
server's door: a misspelled ``"pach"`` would resume a flow without its patch, and
``?lable=kind=order`` would list every state. :class:`RequestChecks` refuses such requests
with a 400 naming every unknown field or parameter, before anything is read or written.

A body is read as JSON only when it says it is (``Content-Type: application/json``); any
other is a 415. A browser sends a cross-site form's POST (``text/plain`` or
``application/x-www-form-urlencoded``) without asking the server first (no CORS preflight),
so without this rule any web page could post JSON to a server without a token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec
import msgspec.inspect as mi
from attrs import frozen
from litestar import Request
from litestar.exceptions import ClientException, SerializationException, ValidationException
from litestar.routes import HTTPRoute

if TYPE_CHECKING:
    from litestar.connection import ASGIConnection
    from litestar.handlers.base import BaseRouteHandler
    from litestar.routes import BaseRoute

__all__ = ["JSON_MEDIA_TYPE", "RequestChecks", "is_json", "unknown_fields"]

#: The one media type a request body may have (parameters such as ``charset`` aside).
JSON_MEDIA_TYPE = "application/json"

#: A problem of a request, as Litestar reports one: where (``key``) and what (``message``).
Problem = dict[str, str]
#: Walks a decoded JSON value of a known type, adding a problem for each unknown field.
_Walk = Callable[[object, str, list[Problem]], None]


def is_json(content_type: str) -> bool:
    """True when a ``Content-Type`` header names JSON: ``application/json``, in any case,
    with or without parameters."""
    return content_type.partition(";")[0].strip().lower() == JSON_MEDIA_TYPE


def unknown_fields(kind: Any) -> Callable[[object], list[Problem]]:
    """What finds the fields of a decoded JSON value that its type ``kind`` does not have,
    at any depth: ``unknown_fields(CommitRequest)(json.loads(body))``.

    Only what ``kind`` would decode is looked at: a value of the wrong shape is left for the
    decoder to refuse. A field's ``key`` is its path (``writes[0].state.lables``).
    """
    walk = _walker(mi.type_info(kind), {})

    def find(value: object) -> list[Problem]:
        problems: list[Problem] = []
        if walk is not None:
            walk(value, "", problems)
        return problems

    return find


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _walker(info: mi.Type, structs: dict[type, _Walk]) -> _Walk | None:
    """What checks a value of type ``info``, or None when nothing inside it can be unknown.

    ``structs`` holds the walkers of the record types seen so far, so that a type that
    contains itself is walked without building its walker forever.
    """
    if isinstance(info, mi.Metadata):
        return _walker(info.type, structs)
    if isinstance(info, mi.StructType | mi.DataclassType | mi.TypedDictType):
        return _record_walker(info, structs)
    if isinstance(info, mi.CollectionType):
        return _items_walker(_walker(info.item_type, structs))
    if isinstance(info, mi.DictType):
        return _values_walker(_walker(info.value_type, structs))
    if isinstance(info, mi.UnionType):
        # A JSON value decodes as the one member of its shape: an object as the record (or
        # the dict), an array as the collection.
        objects = [t for t in info.types if isinstance(t, _OBJECT_TYPES)]
        arrays = [t for t in info.types if isinstance(t, mi.CollectionType)]
        for_object = _walker(objects[0], structs) if len(objects) == 1 else None
        for_array = _walker(arrays[0], structs) if len(arrays) == 1 else None
        if for_object is None and for_array is None:
            return None

        def walk_member(value: object, path: str, problems: list[Problem]) -> None:
            walk = for_object if isinstance(value, dict) else for_array
            if walk is not None and isinstance(value, dict | list):
                walk(value, path, problems)

        return walk_member
    return None


def _items_walker(each: _Walk | None) -> _Walk | None:
    if each is None:
        return None

    def walk_items(value: object, path: str, problems: list[Problem]) -> None:
        if isinstance(value, list):
            for i, item in enumerate(value):
                each(item, f"{path}[{i}]", problems)

    return walk_items


def _values_walker(each: _Walk | None) -> _Walk | None:
    if each is None:
        return None

    def walk_values(value: object, path: str, problems: list[Problem]) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                each(item, f"{path}[{key!r}]", problems)

    return walk_values


_OBJECT_TYPES = (mi.StructType, mi.DataclassType, mi.TypedDictType, mi.DictType)


def _record_walker(
    info: mi.StructType | mi.DataclassType | mi.TypedDictType, structs: dict[type, _Walk]
) -> _Walk:
    known = structs.get(info.cls)
    if known is not None:
        return known
    names = [field.encode_name for field in info.fields]
    if isinstance(info, mi.StructType) and isinstance(info.tag_field, str):
        names.append(info.tag_field)
    allowed = frozenset(names)
    listed = ", ".join(names)
    inner: dict[str, _Walk] = {}

    def walk_record(value: object, path: str, problems: list[Problem]) -> None:
        if not isinstance(value, dict):
            return
        for key, item in value.items():
            if key not in allowed:
                message = f"unknown field (the fields are {listed})"
                problems.append({"key": _join(path, str(key)), "message": message})
            elif (walk := inner.get(key)) is not None:
                walk(item, _join(path, key), problems)

    structs[info.cls] = walk_record  # before the fields: a field may hold this type again
    for field in info.fields:
        walk = _walker(field.type, structs)
        if walk is not None:
            inner[field.encode_name] = walk
    return walk_record


@frozen
class _Shape:
    """What one route handler reads from a request.

    Attributes:
        query: The names of its query parameters.
        body: The type of its body, or None when it takes none.
        unknown: What finds the unknown fields of its body.
    """

    query: frozenset[str]
    body: Any = None
    unknown: Callable[[object], list[Problem]] | None = None


def _shapes(routes: Iterable[BaseRoute]) -> dict[int, _Shape]:
    """The shape of every HTTP route handler, by the handler's ``id``."""
    shapes: dict[int, _Shape] = {}
    for route in routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler, kwargs in route.route_handler_map.values():
            query = frozenset(param.field_alias for param in kwargs.expected_query_params)
            shape = _Shape(query=query)
            if "data" in kwargs.expected_reserved_kwargs:
                body = handler.parsed_fn_signature.parameters["data"].annotation
                shape = _Shape(query=query, body=body, unknown=unknown_fields(body))
            shapes[id(handler)] = shape
    return shapes


def _query_problems(request: Request[Any, Any, Any], shape: _Shape) -> list[Problem]:
    unknown = sorted(set(request.query_params) - shape.query)
    if not unknown:
        return []
    takes = (
        f"the parameters are {', '.join(sorted(shape.query))}"
        if shape.query
        else "this route takes none"
    )
    message = f"unknown query parameter ({takes})"
    return [{"key": name, "message": message} for name in unknown]


def _type_problem(value: object, kind: Any) -> Problem | None:
    """The problem the decoder finds in ``value``, if any: reported together with unknown
    fields, so that a client learns every problem of its body at once."""
    try:
        msgspec.convert(value, kind, strict=False, str_keys=True)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        if where:
            return {"key": where.rstrip("`").lstrip("."), "message": message}
        return {"message": message}
    return None


async def _body_problems(
    request: Request[Any, Any, Any], unknown: Callable[[object], list[Problem]]
) -> list[Problem]:
    """The unknown fields of a JSON body (none when there is no body).

    Raises:
        ClientException: The body is not JSON (415).
    """
    content_type = request.headers.get("content-type")
    if content_type is not None and not is_json(content_type):
        raise ClientException(
            f"the body must be JSON (Content-Type: {JSON_MEDIA_TYPE}), not {content_type!r}",
            status_code=415,
        )
    if not await request.body():
        return []
    if content_type is None:
        raise ClientException(f"a body needs Content-Type: {JSON_MEDIA_TYPE}", status_code=415)
    try:
        value = await request.json()
    except SerializationException:
        return []  # not JSON at all: the route's decoding says so
    return unknown(value)


class RequestChecks:
    """A guard: refuses a body that is not JSON (415), and unknown fields and query
    parameters (400), on every route.

    A request with unknown fields or parameters is answered 400 naming every one of them,
    and the first other problem of its body, as ``Validation failed for METHOD PATH: key:
    message; ...``. The guard learns what each route reads from the built application:
    call :meth:`learn` with its routes.
    """

    def __init__(self) -> None:
        self._shapes: dict[int, _Shape] = {}

    def learn(self, routes: Iterable[BaseRoute]) -> None:
        """Learn the query parameters and body type of each handler of ``routes``."""
        self._shapes.update(_shapes(routes))

    async def __call__(
        self, connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
    ) -> None:
        # The guard is handed a copy of the handler; the scope holds the one routed to.
        shape = self._shapes.get(id(connection.route_handler))
        if shape is None or not isinstance(connection, Request):
            return
        problems = []
        if shape.unknown is not None:
            problems = await _body_problems(connection, shape.unknown)
            if problems:
                found = _type_problem(await connection.json(), shape.body)
                if found is not None:
                    problems.append(found)
        problems = _query_problems(connection, shape) + problems
        if problems:
            raise ValidationException(
                f"Validation failed for {connection.method} {connection.url.path}",
                extra=problems,
            )
