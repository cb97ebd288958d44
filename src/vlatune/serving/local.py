"""A policy server process started for one `vlatune eval --workers N` run, so the model is
loaded once (in the server) instead of once per worker.

The server is `python -m vlatune serve POLICY --port 0` on the loopback interface, on a free
port the OS picks; its first stdout line gives the URL. It stops when the context exits, and
by itself when this process dies (it watches its stdin, a pipe from us, for end of file).

    >>> with LocalServer("runs/x/checkpoint-2000", max_batch=4) as url:
    ...     policy = load_policy(url)
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from vlatune.serving.server import LOOPBACK

WORKER_TIMEOUT = 600  # seconds


def is_learned(spec: str) -> bool:
    """A policy that a server should hold for many workers: a policy or checkpoint folder."""
    return Path(spec).is_dir()


class LocalServer:
    def __init__(
        self,
        policy: str,
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        start_timeout: float = 300.0,
        env: dict[str, str] | None = None,
    ):
        self.policy, self.max_batch, self.max_wait_ms = policy, max_batch, max_wait_ms
        self.start_timeout = start_timeout
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.log: list[str] = []  # the server's stderr lines

    def start(self) -> str:
        cmd = [
            sys.executable, "-m", "vlatune", "serve", self.policy, "--host", LOOPBACK,
            "--port", "0", "--max-batch", str(self.max_batch),
            "--max-wait-ms", str(self.max_wait_ms), "--stop-on-stdin-eof",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(self.env or {})},
        )
        threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True).start()
        found: list[str] = []
        ready = threading.Event()

        def read_url() -> None:
            for line in self.proc.stdout:
                m = re.search(r"on (ws://\S+)", line)
                if m:
                    found.append(m.group(1))
                    break
            ready.set()  # found, or the server exited
            self._drain(self.proc.stdout)

        threading.Thread(target=read_url, daemon=True).start()
        ready.wait(self.start_timeout)
        if not found:
            self.stop()
            tail = "\n".join(self.log[-15:])
            raise RuntimeError(
                f"the policy server for {self.policy} did not start within "
                f"{self.start_timeout:g} s (exit code {self.proc.returncode}):\n{tail}"
            )
        self.url = found[0]
        return self.url

    def _drain(self, stream) -> None:
        for line in stream:
            self.log.append(line.rstrip())

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.stdin.close()  # the server's stdin watcher stops it cleanly
            self.proc.wait(timeout)
        except (subprocess.TimeoutExpired, OSError):
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def server_for_workers(spec) -> Iterator[str | None]:
    """`vlatune eval --workers N` (N > 1) with a learned policy (a checkpoint folder): one
    policy server for the N env workers, yielding its ws:// policy spec (the workers and the
    main process load the policy from it); None otherwise (each worker loads its own copy).
    The clients wait up to WORKER_TIMEOUT s for an answer: the server is our child (if it dies,
    the connections drop at once), and a big model's batch on a CPU may take long."""
    if spec.workers <= 1 or not is_learned(spec.policy):
        yield None
        return
    with LocalServer(spec.policy, max_batch=spec.workers) as url:
        yield f"{url}?timeout={WORKER_TIMEOUT}"
