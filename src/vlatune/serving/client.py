"""The robot side of `vlatune serve`: `PolicyClient`, and `RemotePolicy` for `vlatune eval`.

Observation format (`vlatune.keys`, LIBERO's conventions; the server checks it and names the
field when something is off):

- `images`: {camera: uint8 array (H, W, 3)}, upright (not LIBERO's raw 180-degree-rotated
  render), one entry per camera the policy reads (`client.conventions["cameras"]`);
- `state`: 8 numbers: end-effector position (3), axis-angle (3), gripper finger positions (2);
- `instruction`: the task's language instruction;
- `image_history` (only for a policy whose hello says `image_history` = n > 1, e.g. RDT):
  {camera: [the n - 1 earlier frames, oldest first]}, fewer (none) at an episode's start.

`predict` returns the action chunk (H, 7) in the env convention: delta end-effector pose (6)
and gripper (-1 open, +1 close). Execute some of it, then ask again. Every call waits at most
`timeout` seconds: a server that dies or hangs raises `PolicyServerError`, never blocks.

    >>> client = PolicyClient("ws://127.0.0.1:8000", timeout=30)
    >>> client.reset(instruction="pick up the alphabet soup and place it in the basket")
    >>> chunk = client.predict({"images": {"agentview": a, "wrist": w}, "state": s,
    ...                         "instruction": "pick up the alphabet soup and place it in the basket"})
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from typing import Any

import numpy as np

from vlatune.serving.wire import MAX_MESSAGE, PROTOCOL, decode, encode


class PolicyServerError(ConnectionError):
    """The policy server is gone, silent past the timeout, or answered out of protocol: an
    infrastructure failure (the episode is an error), not a failure of the policy."""


class PolicyRequestError(RuntimeError):
    """The server answered a request with an error: `field` names the offending key of the
    request, or is None when the policy itself raised (`message` holds its exception)."""

    def __init__(self, message: str, field: str | None):
        super().__init__(message if field is None else f"request field {message}")
        self.field = field
        self.message = message


class PolicyClient:
    def __init__(self, url: str, timeout: float = 30.0):
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.url, self.timeout = url, timeout
        self._ids = itertools.count(1)
        self._ws = None
        self.hello: dict[str, Any] = {}
        # this session's cumulative fallback counts, as of the last answer (None: not counted)
        self.last_fallbacks: dict[str, int] | None = None
        self.connect()

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        from websockets.sync.client import connect

        self.close()
        try:
            # entered as a context manager: the form every websockets version >= 13 supports
            self._ws = connect(
                self.url,
                open_timeout=self.timeout,
                close_timeout=1,
                max_size=MAX_MESSAGE,
                compression=None,
            ).__enter__()
        except Exception as e:
            raise PolicyServerError(
                f"cannot reach the policy server at {self.url} ({type(e).__name__}: {e}); "
                "is `vlatune serve` running there?"
            ) from None
        hello = self._receive()
        if hello.get("type") != "hello" or hello.get("protocol") != PROTOCOL:
            self.close()
            raise PolicyServerError(
                f"{self.url} is not a vlatune policy server (expected protocol {PROTOCOL}, "
                f"got {hello.get('protocol')!r})"
            )
        self.hello = hello

    @property
    def connected(self) -> bool:
        from websockets.protocol import State

        return self._ws is not None and self._ws.protocol.state is State.OPEN

    def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):  # already gone
                self._ws.close()
            self._ws = None

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ what the server told us
    @property
    def conventions(self) -> dict[str, Any]:
        return dict(self.hello["conventions"])

    @property
    def description(self) -> dict[str, Any]:
        return dict(self.hello["policy"])

    @property
    def needs_images(self) -> bool:
        return bool(self.hello.get("needs_images", True))

    @property
    def image_history(self) -> int:
        """Consecutive frames the served policy reads (a server without the key: 1)."""
        return int(self.hello.get("image_history", 1) or 1)

    # ------------------------------------------------------------------ requests
    def _receive(self) -> dict[str, Any]:
        try:
            payload = self._ws.recv(timeout=self.timeout)
        except TimeoutError:
            self.close()
            raise PolicyServerError(
                f"the policy server at {self.url} did not answer within {self.timeout:g} s"
            ) from None
        except Exception as e:  # ConnectionClosed and socket errors
            self.close()
            raise PolicyServerError(
                f"the connection to the policy server at {self.url} was lost "
                f"({type(e).__name__}: {e})"
            ) from None
        return decode(payload)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request (an `id` is added) and return its reply; errors raise."""
        if self._ws is None:
            raise PolicyServerError(f"not connected to the policy server at {self.url}")
        rid = next(self._ids)
        try:
            self._ws.send(encode({**message, "id": rid}))
        except Exception as e:
            self.close()
            raise PolicyServerError(
                f"cannot send to the policy server at {self.url} ({type(e).__name__}: {e})"
            ) from None
        reply = self._receive()
        if reply.get("id") != rid:
            self.close()
            raise PolicyServerError(
                f"{self.url} answered request {reply.get('id')!r} while {rid} was expected"
            )
        if reply.get("type") == "error":
            raise PolicyRequestError(str(reply.get("error")), reply.get("field"))
        return reply

    def reset(
        self, instruction: str | None = None, seed: int | None = None, **episode: Any
    ) -> None:
        """Start an episode: the server resets this connection's policy state. `episode` may
        carry suite, task_id, task_name, trial, init_index, init_state (replay policies need
        the last); `seed` restarts this session's random streams (sampling heads)."""
        if instruction is not None:
            episode["instruction"] = instruction
        message: dict[str, Any] = {"type": "reset", "episode": episode}
        if seed is not None:
            message["seed"] = int(seed)
        self.request(message)

    def predict(self, obs: dict[str, Any]) -> np.ndarray:
        """One observation (format above) -> the action chunk (H, 7)."""
        sent = {
            "images": {c: np.asarray(img) for c, img in obs.get("images", {}).items()},
            "state": np.asarray(obs.get("state")) if obs.get("state") is not None else None,
            "instruction": obs.get("instruction"),
        }
        if sent["state"] is None:
            del sent["state"]
        if obs.get("image_history") is not None:  # earlier frames, for a policy that reads them
            sent["image_history"] = {
                c: [np.asarray(img) for img in past] for c, past in obs["image_history"].items()
            }
        reply = self.request({"type": "predict", "obs": sent})
        self.last_fallbacks = reply.get("fallbacks")
        return reply["actions"]

    def stats(self) -> dict[str, Any]:
        return self.request({"type": "stats"})["stats"]


class RemotePolicy:
    """`vlatune eval --policy ws://HOST:PORT`: the eval `Policy` interface over a PolicyClient.
    Conventions, description and training settings (`eval_settings`) are the served policy's
    own: the convention check, the policy config hash and the settings are those of a local run
    of the same policy. Each episode's reset sends the episode's seed (the torch seed the
    runner set), so a sampling head draws what it would draw locally when queries are answered
    one at a time. `fallbacks()` counts this client's queries only. A lost connection is
    re-opened once at the next episode's reset; a server that is gone raises
    `PolicyServerError`."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.client = PolicyClient(url, timeout=timeout)
        self.conventions = self.client.conventions
        self.needs_images = self.client.needs_images
        self.image_history = self.client.image_history
        self.eval_settings = self.client.hello.get("eval_settings")
        self._fallbacks_before: dict[str, int] = {}  # totals of earlier connections
        self._fallbacks: dict[str, int] = {}

    @classmethod
    def from_spec(cls, spec: str) -> RemotePolicy:
        """`ws://HOST:PORT` or `ws://HOST:PORT?timeout=SECONDS` (default 30)."""
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(spec)
        query = parse_qs(parts.query)
        unknown = sorted(set(query) - {"timeout"})
        if unknown or not parts.port:
            raise ValueError(
                f"policy '{spec}': expected ws://HOST:PORT or ws://HOST:PORT?timeout=SECONDS"
            )
        try:
            timeout = float(query.get("timeout", ["30"])[-1])
        except ValueError:
            raise ValueError(f"policy '{spec}': timeout must be a number of seconds") from None
        return cls(parts._replace(query="").geturl(), timeout=timeout)

    def reset(self, ctx) -> None:
        if not self.client.connected:
            self._fallbacks_before = dict(self._fallbacks)
            self.client.connect()
        fields = ("suite", "task_id", "task_name", "instruction", "trial", "init_index")
        episode = {k: getattr(ctx, k) for k in fields}
        episode["init_state"] = np.asarray(ctx.init_state)
        seed = getattr(ctx, "seed", None)
        if seed is None and "torch" in sys.modules:  # the runner seeds torch per episode
            seed = sys.modules["torch"].initial_seed()
        self.client.reset(seed=seed, **episode)

    def predict(self, obs: dict[str, Any]) -> np.ndarray:
        chunk = self.client.predict(obs)
        counts = self.client.last_fallbacks or {}
        keys = set(counts) | set(self._fallbacks_before)
        self._fallbacks = {
            k: self._fallbacks_before.get(k, 0) + counts.get(k, 0) for k in sorted(keys)
        }
        return chunk

    def fallbacks(self) -> dict[str, int]:
        """Cumulative counts of this client's queries the served policy answered by a fallback."""
        return dict(self._fallbacks)

    def describe(self) -> dict[str, Any]:
        return self.client.description

    def close(self) -> None:
        self.client.close()
