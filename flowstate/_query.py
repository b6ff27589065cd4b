"""Query filters (StatesQuery) and result pages (StatesPage), shared by the engine and drivers."""

import datetime
from collections.abc import Mapping, Sequence

import msgspec

from flowstate._checks import is_int
from flowstate._state import State
from flowstate.errors import InvalidQueryError

__all__ = ["StatesPage", "StatesQuery"]


class StatesQuery(msgspec.Struct, kw_only=True, frozen=True):
    """Which state versions to return, oldest revision first.

    Attributes:
        id: Only versions of this state (its history); None: versions of every state.
        labels: One mapping (a version matches when its labels contain every pair) or a list
            of mappings (a version matches when any of them matches). Empty: every version.
        since_rev: Only versions with a revision greater than this (exclusive).
        since_latest: Start at the latest matching version (inclusive); ignores ``since_rev``.
        since_time: Only versions committed at or after this time (timezone-aware).
        latest_only: Only versions that are still their state's latest version.
        limit: Page size, at least 1. A page never splits one revision, so a page may hold
            more than ``limit`` versions when several states share a revision (etcd).
    """

    id: str | None = None
    labels: dict[str, str] | list[dict[str, str]] = msgspec.field(default_factory=dict)
    since_rev: int = 0
    since_latest: bool = False
    since_time: datetime.datetime | None = None
    latest_only: bool = False
    limit: int = 50

    def __post_init__(self) -> None:
        state_id: object = self.id
        if state_id is not None and (not isinstance(state_id, str) or not state_id):
            raise InvalidQueryError(f"id must be a non-empty string or None, not {state_id!r}")
        if not is_int(self.since_rev) or self.since_rev < 0:
            raise InvalidQueryError(f"since_rev must be an int >= 0, not {self.since_rev!r}")
        if not is_int(self.limit) or self.limit < 1:
            raise InvalidQueryError(f"limit must be an int >= 1, not {self.limit!r}")
        # Checked as plain objects: callers may pass anything, whatever the annotations say.
        since_time: object = self.since_time
        if since_time is not None and (
            not isinstance(since_time, datetime.datetime) or since_time.tzinfo is None
        ):
            raise InvalidQueryError("since_time must be a timezone-aware datetime")
        given: object = self.labels
        label_sets = [given] if isinstance(given, Mapping) else given
        if not isinstance(label_sets, Sequence):
            raise InvalidQueryError("labels must be a dict or a list of dicts")
        for labels in label_sets:
            if not isinstance(labels, Mapping) or not all(
                type(k) is str and type(v) is str for k, v in labels.items()
            ):
                raise InvalidQueryError(f"labels must map str to str, not {labels!r}")

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
