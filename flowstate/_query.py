"""Query filters (StatesQuery) and result pages (StatesPage), shared by the engine and drivers."""

import datetime
from collections.abc import Mapping, Sequence
from typing import ClassVar

import msgspec

from flowstate._checks import MAX_REV, as_utc, describe, is_int, is_rev, is_text, is_text_map
from flowstate._state import State
from flowstate.errors import InvalidQueryError

__all__ = ["MAX_LABEL_MAPS", "MAX_LABEL_PAIRS", "MAX_LIMIT", "StatesPage", "StatesQuery"]

#: The largest page size a query may ask for.
MAX_LIMIT = 2**31 - 1
#: The most label mappings a query may OR together, and the most pairs one mapping may hold:
#: bounds every driver can evaluate (a store turns each pair into an index lookup).
MAX_LABEL_MAPS = 64
MAX_LABEL_PAIRS = 64


class StatesQuery(msgspec.Struct, kw_only=True, frozen=True):
    """Which state versions to return, oldest revision first.

    Attributes:
        id: Only versions of this state (its history); None: versions of every state.
        labels: One mapping (a version matches when its labels contain every pair) or a list
            of mappings (a version matches when any of them matches). Empty: every version.
            At most :attr:`MAX_LABEL_MAPS` mappings of at most :attr:`MAX_LABEL_PAIRS` pairs.
        since_rev: Only versions with a revision greater than this (exclusive).
        since_latest: Start at the latest matching version (inclusive) after ``since_rev``
            (with ``since_rev`` 0: where things stand now); none after it: an empty page.
        since_time: Only versions committed at or after this time (timezone-aware).
        latest_only: Only versions that are still their state's latest version.
        limit: Page size, at least 1. A page never splits one revision, so a page may hold
            more than ``limit`` versions when several states share a revision (etcd).
    """

    #: The most label mappings one query may OR together.
    MAX_LABEL_MAPS: ClassVar[int] = MAX_LABEL_MAPS
    #: The most pairs one label mapping may hold.
    MAX_LABEL_PAIRS: ClassVar[int] = MAX_LABEL_PAIRS

    id: str | None = None
    labels: dict[str, str] | list[dict[str, str]] = msgspec.field(default_factory=dict)
    since_rev: int = 0
    since_latest: bool = False
    since_time: datetime.datetime | None = None
    latest_only: bool = False
    limit: int = 50

    def __post_init__(self) -> None:
        state_id: object = self.id
        if state_id is not None and (not state_id or not is_text(state_id)):
            raise InvalidQueryError(
                "id must be a non-empty string of valid Unicode text or None, "
                f"not {describe(state_id)}"
            )
        if not is_rev(self.since_rev):
            raise InvalidQueryError(
                f"since_rev must be an int from 0 to {MAX_REV}, not {describe(self.since_rev)}"
            )
        if not is_int(self.limit) or not 1 <= self.limit <= MAX_LIMIT:
            raise InvalidQueryError(
                f"limit must be an int from 1 to {MAX_LIMIT}, not {describe(self.limit)}"
            )
        # Checked as plain objects: callers may pass anything, whatever the annotations say.
        since_time: object = self.since_time
        if since_time is not None:
            if not isinstance(since_time, datetime.datetime) or since_time.tzinfo is None:
                raise InvalidQueryError("since_time must be a timezone-aware datetime")
            if as_utc(since_time) is None:
                raise InvalidQueryError(
                    f"since_time {since_time!r} has no UTC equivalent that a datetime can hold"
                )
        given: object = self.labels
        label_sets: Sequence[object]
        if isinstance(given, Mapping):
            label_sets = [given]
        elif isinstance(given, Sequence) and not isinstance(given, (str, bytes)):
            label_sets = given
        else:
            raise InvalidQueryError(
                f"labels must be a dict or a list of dicts, not {describe(given)}"
            )
        if len(label_sets) > MAX_LABEL_MAPS:
            raise InvalidQueryError(
                f"labels: at most {MAX_LABEL_MAPS} mappings may be OR-ed, not {len(label_sets)}"
            )
        copies = []
        for labels in label_sets:
            if not isinstance(labels, Mapping) or not is_text_map(labels):
                raise InvalidQueryError(
                    f"labels must map str to str (valid Unicode text), not {describe(labels)}"
                )
            if len(labels) > MAX_LABEL_PAIRS:
                raise InvalidQueryError(
                    f"labels: a mapping may hold at most {MAX_LABEL_PAIRS} pairs, not {len(labels)}"
                )
            copies.append(dict(labels))
        # Stored as plain dicts, so that later changes to the caller's mappings change nothing.
        msgspec.structs.force_setattr(
            self, "labels", copies[0] if isinstance(given, Mapping) else copies
        )

    @property
    def label_sets(self) -> list[dict[str, str]]:
        """The label filter as a list of AND-maps, OR-ed; ``[]`` matches every version."""
        if isinstance(self.labels, dict):
            return [self.labels] if self.labels else []
        if any(not labels for labels in self.labels):
            return []  # an empty AND-map matches everything, and so does the whole OR
        return list(self.labels)

    def matches_labels(self, state: State) -> bool:
        """True when ``state``'s labels satisfy the label filter (``id`` is not checked)."""
        label_sets = self.label_sets
        if not label_sets:
            return True
        labels = state.labels
        return any(all(labels.get(k) == v for k, v in wanted.items()) for wanted in label_sets)

    def replace(self, **changes: object) -> "StatesQuery":
        """Return a copy with some fields changed."""
        return msgspec.structs.replace(self, **changes)


class StatesPage(msgspec.Struct, kw_only=True):
    """One page of query results.

    Attributes:
        states: Matching versions, ascending by revision; independent copies.
        more: True when a next page exists (query again with ``since_rev=states[-1].rev``).
        head_rev: The store's latest revision when the page was read. When ``more`` is False,
            every matching version up to ``head_rev`` has been returned.
    """

    states: list[State]
    more: bool = False
    head_rev: int = 0
