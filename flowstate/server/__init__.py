"""``flowstate serve``: the HTTP API of a store (states, watch, the remote driver's routes).

Install the extra: ``pip install 'flowstate-engine[server]'``. :func:`create_app` builds the ASGI
application on an open engine; ``flowstate serve URL`` runs it on uvicorn.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowstate.server._app import FlowstateApp, RecoveryInfo, ServiceInfo, create_app

__all__ = ["FlowstateApp", "RecoveryInfo", "ServiceInfo", "create_app"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that the `flowstate` command starts without the server's
    # dependencies and tells how to install them only when `serve` is asked for.
    if name in __all__:
        from flowstate.server import _app

        return getattr(_app, name)
    raise AttributeError(f"module 'flowstate.server' has no attribute {name!r}")
