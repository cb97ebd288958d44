"""Progress for long commands: a rich bar on a terminal, plain timed lines otherwise.

Convention: every command that can run longer than about 10 s reports progress through this
module. On a terminal it draws a rich bar with counts (never a bare spinner); when the output
goes to a file or a pipe (a log, CI) it prints one plain line on stderr at least every
``interval`` seconds (default 7 s, ``VLATUNE_PROGRESS_INTERVAL`` overrides it), including a
heartbeat while nothing advances (a long episode, a slow step), so a log never goes silent.
``VLATUNE_PROGRESS=plain|rich|off`` forces a mode.

>>> with Progress(total=20, desc="eval") as p:   # starts on entry (or on first update)
...     for ep in episodes:
...         run(ep)
...         p.update(1, success=ok)          # bar / timed line with "success True"
...         p.note(f"episode {ep}: success")  # always printed, above the bar
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import IO, Any

__all__ = ["Progress", "format_duration"]

DEFAULT_INTERVAL_S = 7.0  # a line at least every 10 s, with margin for a busy machine


def format_duration(seconds: float) -> str:
    """``75.3`` -> ``"1m15s"``; ``3.2`` -> ``"3.2s"``; ``4000`` -> ``"1h06m"``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _resolve_mode(mode: str, stream: IO[str]) -> str:
    env = os.environ.get("VLATUNE_PROGRESS", "").strip().lower()
    if mode == "auto" and env in ("plain", "rich", "off"):
        mode = env
    if mode == "auto":
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        mode = "rich" if tty else "plain"
    if mode not in ("plain", "rich", "off"):
        raise ValueError(f"progress mode must be auto, plain, rich or off, got {mode!r}")
    return mode


class Progress:
    """Count ``total`` units of work labelled ``desc``.

    ``update(n, **info)`` advances by ``n`` and shows ``info`` (``loss=0.12``) beside the
    count; ``set(completed, **info)`` sets the count; ``note(text)`` prints a line in every
    mode (above the bar on a terminal). ``total=None`` counts without a known end.
    ``enabled=False`` (``--no-progress``) prints nothing but notes.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        start: int = 0,
        unit: str = "",
        mode: str = "auto",
        stream: IO[str] | None = None,
        interval: float | None = None,
        enabled: bool = True,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.completed = start
        self.info: dict[str, Any] = {}
        self.stream = stream if stream is not None else sys.stderr
        self.mode = _resolve_mode(mode, self.stream) if enabled else "off"
        if interval is None:
            interval = float(os.environ.get("VLATUNE_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
        self.interval = float(interval)
        self._t0 = time.monotonic()
        self._last_line = self._t0
        self._start = start
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rich = None
        self._task = None
        self._closed = False
        self._started = False

    def start(self) -> Progress:
        """Show the bar / print the first line and start the heartbeat (done on first use)."""
        if self._started:
            return self
        self._started = True
        self._t0 = self._last_line = time.monotonic()
        if self.mode == "rich":
            self._start_rich()
        elif self.mode == "plain":
            self._emit(self._line("started"))
            self._thread = threading.Thread(target=self._heartbeat, daemon=True)
            self._thread.start()
        return self

    # ---- public API -------------------------------------------------------------------------
    def update(self, n: int = 1, **info: Any) -> None:
        self.set(self.completed + n, **info)

    def set(self, completed: int, **info: Any) -> None:
        self.start()
        with self._lock:
            self.completed = completed
            self.info.update(info)
        if self.mode == "rich":
            self._rich.update(
                self._task,
                completed=completed,
                total=self.total,
                info=self._info_text(),
                count=self._count_text(),
            )
        elif self.mode == "plain":
            now = time.monotonic()
            done = self.total is not None and completed >= self.total
            if done or now - self._last_line >= self.interval:
                self._emit(self._line())

    def note(self, text: str) -> None:
        """Print ``text`` as its own line, whatever the mode (above the bar on a terminal)."""
        self.start()
        if self.mode == "rich":
            self._rich.console.print(text, markup=False, highlight=False)
        else:
            self._emit(text)

    def close(self) -> None:
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.mode == "rich":
            self._rich.stop()
        elif self.mode == "plain":
            self._emit(self._line("finished"))

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    # ---- internals --------------------------------------------------------------------------
    def _info_text(self) -> str:
        return "  ".join(f"{k} {_fmt_value(v)}" for k, v in self.info.items())

    def _line(self, event: str = "") -> str:
        with self._lock:
            done, total = self.completed, self.total
            info = self._info_text()
        elapsed = self.elapsed
        unit = f" {self.unit}" if self.unit else ""
        count = f"{done}/{total}{unit} ({100.0 * done / total:.0f}%)" if total else f"{done}{unit}"
        parts = [f"[{self.desc}] {count}", f"elapsed {format_duration(elapsed)}"]
        advanced = done - self._start
        if total and advanced > 0 and done < total:
            eta = elapsed / advanced * (total - done)
            parts.append(f"eta {format_duration(eta)}")
        if info:
            parts.append(info)
        if event:
            parts.append(event)
        return "  ".join(parts)

    def _emit(self, text: str) -> None:
        with self._lock:
            self._last_line = time.monotonic()
            try:
                self.stream.write(text + "\n")
                self.stream.flush()
            except ValueError:  # stream closed under us (interpreter shutting down)
                pass

    def _heartbeat(self) -> None:
        tick = min(1.0, self.interval / 4)
        while not self._stop.wait(tick):
            if time.monotonic() - self._last_line >= self.interval:
                self._emit(self._line())

    def _count_text(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        total = f"/{self.total}" if self.total is not None else ""
        return f"{self.completed}{total}{unit}"

    def _start_rich(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        columns = [
            TextColumn(self.desc),
            BarColumn(),  # pulses while the total is unknown
            TextColumn("{task.fields[count]}"),  # counts, always: never a bare spinner
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        self._rich = RichProgress(*columns, console=Console(file=self.stream))
        self._task = self._rich.add_task(
            self.desc,
            total=self.total,
            completed=self.completed,
            info="",
            count=self._count_text(),
        )
        self._rich.start()
