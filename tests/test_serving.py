"""Policy server (`vlatune serve`, `vlatune.serving`): wire format, named-field errors, ids and
batching with concurrent clients, loopback by default, faults (a client leaving mid-episode, a
server killed or hung), and in the simulator: `vlatune eval --policy ws://...` and
`--workers 2` give the same episodes as the local run (replay and a trained tiny checkpoint),
and a server killed mid-run turns the running episodes into errors.

Every connection is to 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vlatune.eval.policies import ENV_CONVENTIONS
from vlatune.serving import (
    LocalServer,
    PolicyClient,
    PolicyRequestError,
    PolicyServer,
    PolicyServerError,
)
from vlatune.serving.wire import WireError, decode, encode

REPO = Path(__file__).resolve().parents[1]
MARKER_DIR = Path(os.environ.get("VLATUNE_TEST_TMP", "/tmp"))


# ------------------------------------------------------------------------------ test doubles
class Echo:
    """Answers from the observation only: row k of the chunk is state[:7] + k; with
    `predict_batch` (counts its batch sizes); per-episode state: the reset count."""

    conventions = dict(ENV_CONVENTIONS)
    needs_images = False

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.resets = 0

    def reset(self, ctx) -> None:
        self.resets += 1
        self.instruction = ctx.instruction

    @staticmethod
    def answer(obs) -> np.ndarray:
        return np.asarray(obs["state"][:7], np.float64)[None] + np.arange(4)[:, None]

    def predict(self, obs) -> np.ndarray:
        if obs["instruction"] == "raise":
            raise RuntimeError("this observation breaks the policy")
        return self.answer(obs)

    def predict_batch(self, observations) -> np.ndarray:
        self.batch_sizes.append(len(observations))
        return np.stack([self.predict(o) for o in observations])

    def describe(self) -> dict:
        return {"policy": "echo"}


class Counter(Echo):
    """No predict_batch: answers with its per-episode query count (state kept per session)."""

    predict_batch = None

    def reset(self, ctx) -> None:
        self.t = 0

    def predict(self, obs) -> np.ndarray:
        self.t += 1
        return np.full((2, 7), float(self.t))


class Marking(Echo):
    """For a server in another process: touches a marker file at its first query."""

    def predict(self, obs) -> np.ndarray:
        (MARKER_DIR / "served-once").touch()
        return np.array([[0, 0, 0, 0, 0, 0, -1.0]] * 4)


def echo():
    return Echo()


def marking():
    return Marking()


def _obs(i: float, instruction: str = "pick") -> dict:
    return {"images": {}, "state": np.arange(8, dtype=np.float32) + i, "instruction": instruction}


@pytest.fixture
def served():
    handles = []

    def start(policy, **kw):
        server = PolicyServer(policy, **kw)
        handle = server.start_in_thread()
        handles.append(handle)
        return server, handle.url

    yield start
    for h in handles:
        h.stop()


# ------------------------------------------------------------------------------ wire, errors
def test_wire_round_trip_keeps_arrays_bitwise_and_refuses_objects():
    msg = {
        "id": 3,
        "obs": {
            "images": {"wrist": np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)},
            "state": np.array([0.1, -2.5, np.pi], np.float32),
        },
        "flags": [np.array([True, False])],
    }
    back = decode(encode(msg))
    assert back["id"] == 3 and back["obs"]["state"].dtype == np.float32
    assert np.array_equal(back["obs"]["state"], msg["obs"]["state"])
    assert np.array_equal(back["obs"]["images"]["wrist"], msg["obs"]["images"]["wrist"])
    assert back["flags"][0].dtype == bool
    with pytest.raises(TypeError, match="cannot be sent"):
        encode({"x": np.array(["a"], dtype=object)})
    bad = encode(
        {"obs": {"state": {"__ndarray__": True, "dtype": "<f4", "shape": [3], "data": b"x"}}}
    )
    with pytest.raises(WireError, match=r"obs\.state\.data: 1 bytes"):
        decode(bad)


def test_malformed_requests_get_an_error_naming_the_field(served):
    from websockets.sync.client import connect

    _, url = served(Echo())
    with connect(url) as ws:
        assert decode(ws.recv(timeout=10))["type"] == "hello"
        cases = [
            (b"\xc1not msgpack", "message"),
            (encode({"type": "predict"}), "id"),
            (encode({"id": 1, "type": "fly"}), "type"),
            (encode({"id": 2, "type": "predict"}), "obs"),
            (encode({"id": 3, "type": "predict", "obs": {"instruction": "x"}}), "obs.state"),
            (encode({"id": 4, "type": "predict", "obs": {"state": np.zeros(5), "instruction": "x"}}), "obs.state"),
            (encode({"id": 5, "type": "predict", "obs": {"state": np.zeros(8)}}), "obs.instruction"),
            (encode({"id": 6, "type": "predict", "obs": {"images": {"wrist": np.zeros((4, 4, 3))}, "state": np.zeros(8), "instruction": "x"}}), "obs.images.wrist"),
            (encode({"id": 7, "type": "reset", "episode": {"task_id": "zero"}}), "episode.task_id"),
            (encode({"id": 8, "type": "reset", "seed": 1.5}), "seed"),
        ]  # fmt: skip
        for payload, field in cases:
            ws.send(payload)
            reply = decode(ws.recv(timeout=10))
            assert reply["type"] == "error" and reply["field"] == field, (field, reply)
            assert field in reply["error"]
        # the connection is still usable after refused requests
        ws.send(encode({"id": "ok", "type": "predict", "obs": _obs(0)}))
        reply = decode(ws.recv(timeout=10))
        assert reply["id"] == "ok" and np.array_equal(reply["actions"], Echo.answer(_obs(0)))


def test_policy_exception_is_an_error_reply_for_that_request_only(served):
    server, url = served(Echo())
    with PolicyClient(url, timeout=10) as c:
        with pytest.raises(PolicyRequestError, match="breaks the policy") as info:
            c.predict(_obs(0, instruction="raise"))
        assert info.value.field is None
        assert np.array_equal(c.predict(_obs(1)), Echo.answer(_obs(1)))
    assert server.snapshot()["policy_errors"] == 1


def test_hello_reports_conventions_and_description(served):
    _, url = served(Echo())
    with PolicyClient(url, timeout=10) as c:
        assert c.conventions == ENV_CONVENTIONS
        assert c.description == {"policy": "echo"} and c.needs_images is False
        assert c.hello["server"]["batched"] is True


# ------------------------------------------------------------------------------ concurrency
def test_concurrent_clients_get_their_own_answers_in_batches(served):
    n, queries = 4, 12
    server, url = served(Echo(), max_batch=8, max_wait_ms=2000)
    clients = [PolicyClient(url, timeout=30) for _ in range(n)]
    barrier = threading.Barrier(n)
    failures: list[str] = []

    def work(k: int) -> None:
        c = clients[k]
        c.reset(instruction=f"client {k}")
        barrier.wait(timeout=30)
        for q in range(queries):
            obs, rid = _obs(100 * k + q), f"client{k}-query{q}"
            c._ws.send(encode({"id": rid, "type": "predict", "obs": obs}))
            reply = decode(c._ws.recv(timeout=30))
            if reply["id"] != rid or not np.array_equal(reply["actions"], Echo.answer(obs)):
                failures.append(f"{rid}: {reply}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for c in clients:
        c.close()
    assert not failures and not any(t.is_alive() for t in threads)
    stats = server.snapshot()
    assert stats["queries"] == n * queries and stats["looped_queries"] == 0
    # everyone waits for the others (max_wait 2 s, no waiting once all four are queued)
    assert stats["largest_batch"] == n and max(server.policy.batch_sizes) == n


def test_sessions_keep_their_own_episode_state_and_loops_are_reported(served):
    server, url = served(Counter(), max_batch=4, max_wait_ms=0)
    a, b = PolicyClient(url, timeout=10), PolicyClient(url, timeout=10)
    a.reset(instruction="a")
    b.reset(instruction="b")
    for _ in range(3):
        a.predict(_obs(0))
    assert b.predict(_obs(0))[0, 0] == 1.0 and a.predict(_obs(0))[0, 0] == 4.0
    a.reset(instruction="a")
    assert a.predict(_obs(0))[0, 0] == 1.0 and b.predict(_obs(0))[0, 0] == 2.0
    assert server.snapshot()["batched_forward"] is False
    a.close()
    b.close()
    # two sessions asking at once (the batch waits for both): a loop over predict, counted
    server, url = served(Counter(), max_batch=4, max_wait_ms=5000)
    clients = [PolicyClient(url, timeout=30) for _ in range(2)]
    for c in clients:
        c.reset(instruction="c")
    replies = []
    threads = [
        threading.Thread(target=lambda c=c: replies.append(c.predict(_obs(0)))) for c in clients
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [r[0, 0] for r in replies] == [1.0, 1.0]
    stats = server.snapshot()
    assert stats["largest_batch"] == 2 and stats["looped_queries"] == 2
    for c in clients:
        c.close()


def test_a_client_leaving_mid_episode_does_not_disturb_the_others(served):
    server, url = served(Echo(), max_batch=4, max_wait_ms=50)
    stay = PolicyClient(url, timeout=10)
    stay.reset(instruction="stay")
    for k in range(3):
        leaver = PolicyClient(url, timeout=10)
        leaver.reset(instruction="leave")
        leaver.predict(_obs(k))
        leaver._ws.send(encode({"id": 99, "type": "predict", "obs": _obs(k)}))  # then gone
        leaver._ws.socket.close()
        assert np.array_equal(stay.predict(_obs(10 + k)), Echo.answer(_obs(10 + k)))
    deadline = time.monotonic() + 10
    while server.snapshot()["sessions"] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.snapshot()["sessions"] == 1
    assert np.array_equal(stay.predict(_obs(5)), Echo.answer(_obs(5)))
    stay.close()


# ------------------------------------------------------------------------------ the CLI server
def _serve(*args: str) -> tuple[subprocess.Popen, str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlatune", "serve", *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # bounded: the process prints it, or exits (EOF)
    url = line.split(" on ")[1].split()[0] if " on ws://" in line else ""
    return proc, url, line


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
    proc.wait(timeout=30)


def test_serve_binds_loopback_by_default_and_says_so():
    proc, url, line = _serve("tests.test_serving:echo", "--port", "0")
    try:
        assert url.startswith("ws://127.0.0.1:"), line
        assert "loopback only" in line and "--host 0.0.0.0" in line
        with PolicyClient(url, timeout=30) as c:
            assert np.array_equal(c.predict(_obs(2)), Echo.answer(_obs(2)))
    finally:
        _stop(proc)


def test_serve_refuses_the_scripted_expert(repo):
    from tests.conftest import run_cli

    r = run_cli("serve", "scripted", "--port", "0", timeout=120)
    assert r.returncode == 1 and "reads the simulator" in r.stderr


def test_a_dead_or_hung_server_raises_within_the_timeout():
    proc, url, _ = _serve("tests.test_serving:echo", "--port", "0")
    try:
        c = PolicyClient(url, timeout=2)
        c.predict(_obs(0))
        os.kill(proc.pid, signal.SIGSTOP)  # hung: no answer
        t0 = time.monotonic()
        with pytest.raises(PolicyServerError, match="did not answer within 2 s"):
            c.predict(_obs(1))
        assert time.monotonic() - t0 < 30
        os.kill(proc.pid, signal.SIGKILL)  # dead: reconnecting fails at once
        proc.wait(timeout=30)
        with pytest.raises(PolicyServerError, match="cannot reach the policy server"):
            c.connect()
    finally:
        _stop(proc)


def test_local_server_starts_and_stops():
    server = LocalServer("tests.test_serving:echo")
    with server as url:
        assert url.startswith("ws://127.0.0.1:")
        with PolicyClient(url, timeout=30) as c:
            assert c.description == {"policy": "echo"}
    assert server.proc.wait(timeout=30) is not None


# ------------------------------------------------------------------------------ simulator
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from vlatune.sim.synth import synthesize

    out = tmp_path_factory.mktemp("synth") / "demos"
    synthesize("libero_object", [0], episodes=2, out=out, resolution=64, first_init=0)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from tests.data_fixtures import make_libero_hdf5

    root = tmp_path_factory.mktemp("tiny")
    data = make_libero_hdf5(root / "data", demos=4, T=16, res=64)
    run = root / "run"
    args = [
        sys.executable, "-m", "vlatune", "train", "demo/tiny", "--no-progress",
        f"data.path={data}", "data.format=auto", "data.image_size=64", "data.batch_size=4",
        "policy.tiny.dim=32", "policy.heads.mlp_dim=32", f"train.output_dir={run}",
        "train.max_steps=4", "train.save_every=4", "train.log_every=2",
    ]  # fmt: skip
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return run / "checkpoint-4"


def _outcomes(out: Path) -> list[tuple]:
    from vlatune.eval.runner import read_episodes

    eps = read_episodes(out / "episodes.jsonl")
    return sorted((e["id"], e["success"], e["steps"], e["error"]) for e in eps)


def _spec(policy: str, out: Path, **kw):
    from vlatune.eval.runner import EvalSpec

    settings = {"tasks": [0], "trials": 2, "max_steps": 24, "video": "none", **kw}
    return EvalSpec(policy=policy, out=out, **settings)


@pytest.mark.sim
@pytest.mark.parametrize("which", ["replay", "checkpoint"])
def test_served_eval_gives_the_local_episodes(which, request, tmp_path, monkeypatch):
    from vlatune.eval.runner import evaluate

    policy = (
        f"replay:{request.getfixturevalue('synth')}"
        if which == "replay"
        else str(request.getfixturevalue("checkpoint"))
    )
    evaluate(_spec(policy, tmp_path / "local"))
    local = _outcomes(tmp_path / "local")
    assert len(local) == 2 and all(e[3] is None for e in local)
    with LocalServer(policy) as url:
        evaluate(_spec(url, tmp_path / "served"))
    assert _outcomes(tmp_path / "served") == local
    run_local = json.loads((tmp_path / "local" / "run.json").read_text())
    run_served = json.loads((tmp_path / "served" / "run.json").read_text())
    assert run_served["policy_config_hash"] == run_local["policy_config_hash"]
    assert run_served["settings"]["resolution"] == run_local["settings"]["resolution"]
    if which == "checkpoint":  # --workers 2 with a learned policy: one server, two clients
        started = []
        real_start = LocalServer.start

        def start(self):
            started.append(self.policy)
            return real_start(self)

        monkeypatch.setattr(LocalServer, "start", start)
        evaluate(_spec(policy, tmp_path / "workers", workers=2))
        assert started == [policy]
        assert _outcomes(tmp_path / "workers") == local


@pytest.mark.sim
def test_killing_the_server_mid_run_turns_running_episodes_into_errors(tmp_path):
    from vlatune.eval.runner import evaluate, read_episodes

    marker = MARKER_DIR / "served-once"
    marker.unlink(missing_ok=True)
    proc, url, line = _serve("tests.test_serving:marking", "--port", "0")
    try:
        assert url, line
        spec = _spec(f"{url}?timeout=5", tmp_path, trials=3, max_steps=400)
        done: list = []
        t = threading.Thread(target=lambda: done.append(evaluate(spec)), daemon=True)
        t.start()
        deadline = time.monotonic() + 300
        while not marker.exists() and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.1)
        assert marker.exists()
        proc.kill()
        t.join(timeout=300)
        assert not t.is_alive() and done
    finally:
        _stop(proc)
    eps = read_episodes(tmp_path / "episodes.jsonl")
    assert len(eps) == 3
    for e in eps:
        assert e["success"] is None and "policy server" in e["error"], e
