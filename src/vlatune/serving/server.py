"""`vlatune serve`: one policy answers observation -> action-chunk requests over a websocket,
batching the requests that arrive together into one forward pass.

Conventions (openpi's: one policy process, any number of environment or robot clients; a
binary msgpack frame per message, numpy arrays as in `vlatune.serving.wire`):

- on connect the server sends `{"type": "hello", "protocol": "vlatune-serve/1", "conventions":
  {...}, "policy": describe(), "needs_images": bool, "image_history": int, "eval_settings":
  {...} or null, "server": {"max_batch", "max_wait_ms", "batched"}}`, so a client checks
  conventions (and uses the policy's training settings) before any episode; `image_history` = n
  > 1 asks for the n - 1 frames before the current one in each observation (RDT: 2 frames);
- every request is a map with an `id` (int or str, echoed in the reply) and a `type`:
  - `{"type": "reset", "id", "episode": {suite, task_id, task_name, instruction, trial,
    init_index, init_state}, "seed": int}` (every key optional) starts an episode: the
    session's copy of the policy is `reset`; with `seed` the torch and numpy random streams of
    this session restart from it. Reply `{"type": "reset", "id"}`;
  - `{"type": "predict", "id", "obs": {"images": {camera: uint8 (H, W, 3) upright}, "state":
    (8,) numbers, "instruction": str, "image_history": {camera: [uint8 (H, W, 3), ...] oldest
    first} (optional; read by a policy whose hello says image_history > 1)}}`. Reply `{"type": "actions", "id", "actions": (H, 7)}`
    in the env convention (gripper -1 open, +1 close), plus `"fallbacks": {name: count}` (this
    session's cumulative count of queries answered by a fallback) for a policy that counts
    them (`fallbacks()`; a batch in which one was taken is re-answered one query at a time,
    so each session's count is exact);
  - `{"type": "stats", "id"}`. Reply `{"type": "stats", "id", "stats": {...}}`;
- a request that cannot be served gets `{"type": "error", "id", "field", "error"}`: `field` names
  the offending key (`obs.state`, `obs.images.wrist`, `type`, ...), or is null when the policy
  itself raised (`error` then holds the exception).

Per-episode state lives in a per-connection session (a shallow copy of the loaded policy, so
weights are shared and `reset` state is not). Predict requests of different sessions that
arrive within `max_wait_ms` of the first (up to `max_batch`; no waiting once every session that
has started an episode or asked for actions has one queued) go through
`policy.predict_batch(observations)` in one forward pass when the policy has it (a policy whose answer depends on the observation only, as
`VLAPolicy`); otherwise they are answered one by one with each session's `predict`, counted in
the stats as `looped_queries`. A batch that raises is retried one query at a time, so one bad
observation fails only its own request. Random draws (sampling heads) follow the session's seed
when a query is answered alone; in a batch of several they come from one shared stream
(`shared_rng_queries` in the stats). Binds 127.0.0.1 unless told otherwise.

    >>> server = PolicyServer(load_policy("runs/x/checkpoint-2000"), max_batch=8)
    >>> asyncio.run(server.serve("127.0.0.1", 8000))
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import dataclasses
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlatune.serving.wire import MAX_MESSAGE, PROTOCOL, WireError, decode, encode

LOOPBACK = "127.0.0.1"


@dataclass
class _Session:
    number: int
    policy: Any
    seed: int | None = None
    rng: tuple[Any, Any] | None = None  # (torch CPU state, numpy state) between queries
    fallbacks: dict[str, int] = field(default_factory=dict)  # cumulative, this session's queries
    active: bool = False  # has started an episode or asked for actions
    closed: bool = False


@dataclass
class _Query:
    session: _Session
    obs: dict[str, Any]
    future: asyncio.Future = field(repr=False)


def _check_obs(obs: Any, conventions: dict[str, Any], needs_images: bool) -> dict[str, Any]:
    """The observation of a predict request, or WireError naming the bad field."""
    if not isinstance(obs, dict):
        raise WireError("obs", "expected a map with images, state and instruction")
    images = obs.get("images", {})
    if not isinstance(images, dict):
        raise WireError("obs.images", "expected a map camera -> uint8 (H, W, 3) array")
    for cam, img in images.items():
        if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3):
            got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise WireError(f"obs.images.{cam}", f"expected a uint8 (H, W, 3) array, got {got}")
        if img.shape[2] != 3:
            raise WireError(f"obs.images.{cam}", f"expected 3 channels, got shape {img.shape}")
    if needs_images:
        for cam in conventions.get("cameras") or []:
            if cam not in images:
                raise WireError(
                    f"obs.images.{cam}",
                    f"missing; the policy reads cameras {list(conventions['cameras'])}",
                )
    if "state" not in obs:
        raise WireError("obs.state", "missing (the robot state, 8 numbers for LIBERO)")
    state = obs["state"]
    if isinstance(state, list):
        state = np.asarray(state) if all(isinstance(v, int | float) for v in state) else None
    if not isinstance(state, np.ndarray) or state.ndim != 1 or state.dtype.kind not in "iuf":
        raise WireError("obs.state", "expected a 1-d array of numbers")
    if conventions.get("state") == "libero_8d" and state.shape != (8,):
        raise WireError("obs.state", f"expected 8 values (libero_8d), got {state.shape[0]}")
    instruction = obs.get("instruction")
    if not isinstance(instruction, str):
        raise WireError("obs.instruction", f"expected a string, got {type(instruction).__name__}")
    out = {"images": images, "state": state, "instruction": instruction}
    history = obs.get("image_history")
    if history is not None:
        if not isinstance(history, dict):
            raise WireError("obs.image_history", "expected a map camera -> list of uint8 images")
        for cam, past in history.items():
            if not isinstance(past, list):
                raise WireError(
                    f"obs.image_history.{cam}",
                    f"expected a list of uint8 (H, W, 3) arrays, oldest first, got "
                    f"{type(past).__name__}",
                )
            for i, img in enumerate(past):
                ok = isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3
                if not ok or img.shape[2] != 3:
                    got = (
                        f"{img.dtype} {img.shape}"
                        if isinstance(img, np.ndarray)
                        else type(img).__name__
                    )
                    raise WireError(
                        f"obs.image_history.{cam}[{i}]",
                        f"expected a uint8 (H, W, 3) array, got {got}",
                    )
        out["image_history"] = history
    return out


def _episode_context(episode: Any):
    from vlatune.eval.policies import EpisodeContext

    if not isinstance(episode, dict):
        raise WireError("episode", "expected a map (suite, task_id, instruction, init_state, ...)")
    types = {
        "suite": str,
        "task_id": int,
        "task_name": str,
        "instruction": str,
        "trial": int,
        "init_index": int,
    }
    values: dict[str, Any] = {
        "suite": "",
        "task_id": -1,
        "task_name": "",
        "instruction": "",
        "trial": -1,
        "init_index": -1,
        "init_state": np.zeros(0),
        "env": None,
    }
    for k, t in types.items():
        if k in episode:
            if not isinstance(episode[k], t):
                raise WireError(f"episode.{k}", f"expected {t.__name__}, got {episode[k]!r}")
            values[k] = episode[k]
    if "init_state" in episode:
        s = episode["init_state"]
        if not isinstance(s, np.ndarray) or s.ndim != 1:
            raise WireError("episode.init_state", "expected a 1-d array")
        values["init_state"] = s
    known = {f.name for f in dataclasses.fields(EpisodeContext)}
    return EpisodeContext(**{k: v for k, v in values.items() if k in known})


class PolicyServer:
    def __init__(self, policy: Any, max_batch: int = 8, max_wait_ms: float = 5.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("--max-batch must be at least 1 and --max-wait-ms at least 0")
        conventions = getattr(policy, "conventions", None)
        if not isinstance(conventions, dict):
            raise ValueError("the policy declares no conventions; it cannot be served")
        try:  # every connection gets a shallow copy for its episode state
            copy.copy(policy)
        except Exception as e:
            raise ValueError(
                f"the policy ({type(policy).__name__}) cannot be copied per session, so it cannot "
                f"be served: {type(e).__name__}: {e}"
            ) from None
        self.policy = policy
        # as plain data (paths and other objects become strings), as a local run.json has them
        self.conventions = _plain(dict(conventions))
        self.description = _plain(policy.describe())
        self.eval_settings = _plain(getattr(policy, "eval_settings", None))
        self.needs_images = bool(getattr(policy, "needs_images", True))
        self.image_history = int(getattr(policy, "image_history", 1) or 1)
        self.batched = callable(getattr(policy, "predict_batch", None))
        self.counts_fallbacks = callable(getattr(policy, "fallbacks", None))
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.sessions: dict[int, _Session] = {}
        self._next_session = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policy")
        self.stats: dict[str, Any] = {
            "batched_forward": self.batched,
            "connections": 0,
            "queries": 0,
            "batches": 0,
            "largest_batch": 0,
            "looped_queries": 0,
            "batch_retries": 0,
            "fallback_reruns": 0,
            "shared_rng_queries": 0,
            "policy_errors": 0,
            "refused_requests": 0,
            "forward_s": 0.0,
        }

    # ------------------------------------------------------------------ protocol
    def hello(self) -> dict[str, Any]:
        return {
            "type": "hello",
            "protocol": PROTOCOL,
            "conventions": self.conventions,
            "policy": self.description,
            "needs_images": self.needs_images,
            "image_history": self.image_history,
            "eval_settings": self.eval_settings,
            "server": {
                "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait * 1000,
                "batched": self.batched,
            },
        }

    def snapshot(self) -> dict[str, Any]:
        s = dict(self.stats)
        s["sessions"] = len(self.sessions)
        s["mean_batch"] = round(s["queries"] / s["batches"], 3) if s["batches"] else None
        s["forward_s"] = round(s["forward_s"], 3)
        return s

    async def _handle(self, ws) -> None:
        import websockets

        self._next_session += 1
        session = _Session(self._next_session, copy.copy(self.policy))
        self.sessions[session.number] = session
        self.stats["connections"] += 1
        try:
            await ws.send(encode(self.hello()))
            async for payload in ws:
                reply = await self._answer(session, payload)
                await ws.send(encode(reply))
        except websockets.ConnectionClosed:
            pass  # the client went away, maybe mid-episode: only its session ends
        finally:
            session.closed = True
            self.sessions.pop(session.number, None)

    async def _answer(self, session: _Session, payload: Any) -> dict[str, Any]:
        rid = None
        try:
            msg = decode(payload)
            rid = msg.get("id")
            if "id" not in msg:
                raise WireError("id", "missing (every request carries an id, echoed in its reply)")
            if not isinstance(rid, int | str) or isinstance(rid, bool):
                rid = None
                raise WireError("id", "expected an integer or a string")
            kind = msg.get("type")
            if kind == "predict":
                obs = _check_obs(msg.get("obs"), self.conventions, self.needs_images)
                session.active = True
                future = asyncio.get_running_loop().create_future()
                await self._queue.put(_Query(session, obs, future))
                ok, value = await future
                if not ok:
                    self.stats["policy_errors"] += 1
                    return {"type": "error", "id": rid, "field": None, "error": value}
                reply = {"type": "actions", "id": rid, "actions": value}
                if self.counts_fallbacks:
                    reply["fallbacks"] = dict(session.fallbacks)
                return reply
            if kind == "reset":
                ctx = _episode_context(msg.get("episode", {}))
                session.active = True
                seed = msg.get("seed")
                if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
                    raise WireError("seed", f"expected an integer, got {seed!r}")
                loop = asyncio.get_running_loop()
                error = await loop.run_in_executor(self._executor, self._reset, session, ctx, seed)
                if error:
                    self.stats["policy_errors"] += 1
                    return {"type": "error", "id": rid, "field": None, "error": error}
                return {"type": "reset", "id": rid}
            if kind == "stats":
                return {"type": "stats", "id": rid, "stats": self.snapshot()}
            raise WireError("type", f"expected reset, predict or stats, got {kind!r}")
        except WireError as e:
            self.stats["refused_requests"] += 1
            return {"type": "error", "id": rid, "field": e.field, "error": str(e)}

    # ------------------------------------------------------------------ policy calls (one thread)
    def _reset(self, session: _Session, ctx, seed: int | None) -> str | None:
        try:
            if seed is not None:
                _set_rng(seed=seed)
                session.rng = _get_rng()
            session.seed = seed
            session.policy.reset(ctx)
            if seed is not None:
                session.rng = _get_rng()
        except Exception as e:
            return _describe_error(e)
        return None

    def _fallbacks(self, policy: Any) -> dict[str, int]:
        if not self.counts_fallbacks:
            return {}
        return {str(k): int(v) for k, v in policy.fallbacks().items()}

    def _one(self, q: _Query) -> tuple[bool, Any]:
        try:
            if q.session.rng is not None:
                _set_rng(state=q.session.rng)
            answering = self.policy if self.batched else q.session.policy
            before = self._fallbacks(answering)
            if self.batched:
                out = np.asarray(self.policy.predict_batch([q.obs]))[0]
            else:
                out = answering.predict(q.obs)
            for k, v in self._fallbacks(answering).items():
                q.session.fallbacks[k] = q.session.fallbacks.get(k, 0) + v - before.get(k, 0)
            if q.session.rng is not None:
                q.session.rng = _get_rng()
            return True, _chunk(out)
        except Exception as e:
            return False, _describe_error(e)

    def _forward(self, batch: list[_Query]) -> list[tuple[bool, Any]]:
        t0 = time.perf_counter()
        try:
            if len(batch) == 1:
                return [self._one(batch[0])]
            self.stats["shared_rng_queries"] += sum(q.session.seed is not None for q in batch)
            if self.batched:
                try:
                    before = self._fallbacks(self.policy)
                    out = np.asarray(self.policy.predict_batch([q.obs for q in batch]))
                    if out.ndim != 3 or out.shape[0] != len(batch):
                        raise ValueError(f"predict_batch returned shape {out.shape}")
                    if self._fallbacks(self.policy) == before:
                        return [(True, _chunk(a)) for a in out]
                    # a fallback was taken by some query of the batch: answer them one by one
                    # so each session's count is exact
                    self.stats["fallback_reruns"] += 1
                except Exception:
                    self.stats["batch_retries"] += 1
            else:
                self.stats["looped_queries"] += len(batch)
            return [self._one(q) for q in batch]
        finally:
            self.stats["forward_s"] += time.perf_counter() - t0

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            # no waiting once every active session has a query queued (a connection that only
            # watches, like the eval main process, is not waited for)
            asking = sum(1 for s in self.sessions.values() if s.active)
            while len(batch) < min(self.max_batch, asking):
                if self._queue.empty():
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), left))
                    except asyncio.TimeoutError:
                        break
                else:
                    batch.append(self._queue.get_nowait())
            live = [q for q in batch if not q.session.closed]
            for q in batch:
                if q.session.closed:
                    q.future.cancel()
            if not live:
                continue
            self.stats["batches"] += 1
            self.stats["queries"] += len(live)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(live))
            results = await loop.run_in_executor(self._executor, self._forward, live)
            for q, r in zip(live, results, strict=True):
                if not q.future.done():
                    q.future.set_result(r)

    # ------------------------------------------------------------------ running
    async def serve(
        self,
        host: str = LOOPBACK,
        port: int = 8000,
        ready: Any = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Serve until `stop` is set (or forever). `ready(url)` is called once listening."""
        from websockets.asyncio.server import serve

        self._queue: asyncio.Queue[_Query] = asyncio.Queue()
        batcher = asyncio.create_task(self._batcher())
        try:
            async with serve(
                self._handle, host, port, max_size=MAX_MESSAGE, compression=None
            ) as server:
                bound = server.sockets[0].getsockname()
                url = f"ws://{_url_host(bound[0])}:{bound[1]}"
                if ready is not None:
                    ready(url)
                if stop is None:
                    await asyncio.Future()
                else:
                    await stop.wait()
        finally:
            batcher.cancel()

    def start_in_thread(self, host: str = LOOPBACK, port: int = 0, timeout: float = 30.0):
        """Serve from a background thread (tests, notebooks). Returns a handle with `.url` and
        `.stop()`."""
        return _ThreadHandle(self, host, port, timeout)


class _ThreadHandle:
    def __init__(self, server: PolicyServer, host: str, port: int, timeout: float):
        self.url: str | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

        def run() -> None:
            async def main() -> None:
                self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
                await server.serve(host, port, ready=self._set_url, stop=self._stop)

            try:
                asyncio.run(main())
            except BaseException as e:  # reported by the constructor or stop()
                self._error = e
                self._ready.set()

        self._thread = threading.Thread(target=run, name="policy-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self.url is None:
            raise RuntimeError(f"the policy server did not start within {timeout} s: {self._error}")

    def _set_url(self, url: str) -> None:
        self.url = url
        self._ready.set()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


def _plain(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def _get_rng() -> tuple[Any, Any]:
    """The global random streams a policy draws from: torch's CPU generator (when the policy
    uses torch, it is imported) and numpy's legacy one."""
    torch = sys.modules.get("torch")
    return (torch.get_rng_state() if torch else None, np.random.get_state())


def _set_rng(seed: int | None = None, state: tuple[Any, Any] | None = None) -> None:
    torch = sys.modules.get("torch")
    if seed is not None:
        if torch:
            torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
    elif state is not None:
        if torch and state[0] is not None:
            torch.set_rng_state(state[0])
        np.random.set_state(state[1])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _chunk(out: Any) -> np.ndarray:
    a = np.asarray(out)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.dtype.kind not in "iuf":
        raise ValueError(f"the policy returned {a.dtype} {a.shape}, expected an (H, 7) chunk")
    return a


def _describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}\n" + "".join(traceback.format_tb(e.__traceback__, limit=-3))


def run(
    policy_spec: str,
    host: str = LOOPBACK,
    port: int = 8000,
    max_batch: int = 8,
    max_wait_ms: float = 5.0,
    stop_on_stdin_eof: bool = False,
) -> None:
    """`vlatune serve`: load `policy_spec` (what `vlatune eval --policy` accepts) and serve it
    until interrupted. The first stdout line says where: `serving ... on ws://HOST:PORT`."""
    from vlatune.eval.policies import load_policy

    if policy_spec == "scripted":
        raise ValueError(
            "the scripted expert reads the simulator's state, not observations, so it cannot be "
            "served; run it locally: vlatune eval --policy scripted"
        )
    if policy_spec.startswith(("ws://", "wss://")):
        raise ValueError(f"{policy_spec} is already a policy server")
    server = PolicyServer(load_policy(policy_spec), max_batch=max_batch, max_wait_ms=max_wait_ms)

    def ready(url: str) -> None:
        where = (
            "loopback only: other machines cannot connect; --host 0.0.0.0 serves every interface"
            if host in (LOOPBACK, "localhost", "::1")
            else f"listening on {host}: reachable from other machines"
        )
        print(f"serving {policy_spec} on {url} ({where})", flush=True)
        print(
            f"batching: up to {max_batch} requests, waiting at most {max_wait_ms:g} ms; "
            + (
                "one forward pass per batch (predict_batch)"
                if server.batched
                else "the policy has no predict_batch: requests are answered one by one"
            ),
            file=sys.stderr,
            flush=True,
        )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # stop cleanly, printing the stats
            loop.add_signal_handler(sig, stop.set)
        if stop_on_stdin_eof:  # a parent that started us (LocalServer) closed our stdin or died

            def watch() -> None:
                sys.stdin.buffer.read()
                loop.call_soon_threadsafe(stop.set)

            threading.Thread(target=watch, daemon=True).start()
        await server.serve(host, port, ready=ready, stop=stop)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    finally:
        print(f"server stats: {server.snapshot()}", file=sys.stderr, flush=True)
