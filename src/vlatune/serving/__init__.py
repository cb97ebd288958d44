"""One policy, many clients: `vlatune serve` (a batching websocket server), `PolicyClient` (what
a robot loop or an eval worker calls) and `LocalServer` (the server `vlatune eval --workers N`
starts for a learned policy). Wire format: `vlatune.serving.wire`; protocol:
`vlatune.serving.server`; guide: docs/serving.md.

    >>> from vlatune.serving import PolicyClient
    >>> chunk = PolicyClient("ws://127.0.0.1:8000").predict(obs)
"""

from vlatune.serving.client import (
    PolicyClient,
    PolicyRequestError,
    PolicyServerError,
    RemotePolicy,
)
from vlatune.serving.local import LocalServer
from vlatune.serving.server import PolicyServer

__all__ = [
    "LocalServer",
    "PolicyClient",
    "PolicyRequestError",
    "PolicyServer",
    "PolicyServerError",
    "RemotePolicy",
]
