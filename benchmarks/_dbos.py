"""DBOS on a SQLite system database: the contender a user would pick instead of flowstate.

Imported only by the DBOS measurement (``pip install 'flowstate-engine[bench]'`` brings DBOS).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any


def dbos_seconds(path: Path, synchronous: str, n: int, steps: int) -> float:
    """Seconds for ``n // steps`` DBOS workflows of ``steps`` no-op async steps, one after
    another, on a SQLite system database in WAL mode at ``synchronous``.
    """
    import sqlalchemy as sa
    from dbos import DBOS

    def pragmas(dbapi_conn: Any, _record: Any) -> None:
        # What flowstate's store runs with: WAL, and the same synchronous setting.
        dbapi_conn.execute("PRAGMA journal_mode = WAL")
        dbapi_conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")

    sa.event.listen(sa.engine.Engine, "connect", pragmas)

    @DBOS.step()
    async def noop() -> None:
        return None

    @DBOS.workflow()
    async def workflow() -> int:
        for _ in range(steps):
            await noop()
        return steps

    workflows = max(1, n // steps)
    DBOS(
        config={
            "name": "flowstate-bench",
            "system_database_url": f"sqlite:///{path}",
            "log_level": "WARNING",
        }
    )
    DBOS.launch()
    try:

        async def run() -> float:
            start = time.perf_counter()
            for _ in range(workflows):
                if await workflow() != steps:
                    raise RuntimeError("a DBOS workflow did not run every step")
            return time.perf_counter() - start

        elapsed = asyncio.run(run())
    finally:
        DBOS.destroy(destroy_registry=True)
        sa.event.remove(sa.engine.Engine, "connect", pragmas)
    return elapsed * n / (workflows * steps)
