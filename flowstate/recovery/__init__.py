"""Recovery: the leader-elected Recoverer and Delayer, and per-state recovery settings.

A committed state that is *running* will complete: the :class:`Recoverer` retries it when
it stalls and force-ends it once its attempts are spent (or hands it to a flow of its own,
see :func:`set_on_exhausted`), and the :class:`Delayer` fires its
delays. Run either as ``async with Recoverer(engine):`` in the application, or as a cluster
service with ``flowstate recover URL --flows package.module:flows`` (as many replicas as
you like: one leads, the others stand by).
"""

from flowstate.recovery._services import Delayer, Recoverer, RecoveryStats
from flowstate.recovery._settings import (
    ENDED_REASON,
    attempt,
    disable,
    is_disabled,
    set_max_attempts,
    set_on_exhausted,
    set_retry_after,
)

__all__ = [
    "ENDED_REASON",
    "Delayer",
    "Recoverer",
    "RecoveryStats",
    "attempt",
    "disable",
    "is_disabled",
    "set_max_attempts",
    "set_on_exhausted",
    "set_retry_after",
]
