"""MP4 encoding and frame-accurate decoding with PyAV (no torchvision, no ffmpeg binary).

Encoding uses a short GOP (a key frame every 2 frames, as LeRobot does) so that reading the
frames a training sample needs costs one seek and a frame or two of decoding.

    >>> encode_video(frames, "ep.mp4", fps=20)               # (T, H, W, 3) uint8, H.264
    >>> decode_frames("ep.mp4", [0, 5, 6], fps=20).shape      # (3, H, W, 3)
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

CODECS = {"h264": "libx264", "av1": "libsvtav1"}


class VideoWriter:
    """Incremental MP4 writer: frames keep one time line across `write` calls (LeRobot v3.0
    packs many episodes in one file; episode k starts at the frame count written before it)."""

    def __init__(
        self, path: str | Path, fps: float, codec: str = "h264", crf: int = 18, gop: int = 2
    ):
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps, self.codec, self.crf, self.gop = fps, codec, crf, gop
        self.container = av.open(str(self.path), mode="w")
        self.stream = None
        self.frames_written = 0

    def _open_stream(self, H: int, W: int) -> None:
        if H % 2 or W % 2:
            raise ValueError(f"yuv420p video needs even height and width, got {H}x{W}")
        rate = Fraction(self.fps).limit_denominator(1000)
        stream = self.container.add_stream(CODECS[self.codec], rate=rate)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.time_base = 1 / rate
        if self.codec == "h264":
            stream.options = {
                "crf": str(self.crf),
                "g": str(self.gop),
                "preset": "veryfast",
                "bf": "0",
            }
        else:
            os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its banner to stderr otherwise
            stream.options = {"crf": str(self.crf), "g": str(self.gop), "preset": "10"}
        self.stream = stream

    def write(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}"
            )
        if self.stream is None:
            self._open_stream(frames.shape[1], frames.shape[2])
        elif (frames.shape[1], frames.shape[2]) != (self.stream.height, self.stream.width):
            raise ValueError(
                f"{self.path}: frame size changed from {self.stream.height}x{self.stream.width} to {frames.shape[1]}x{frames.shape[2]}"
            )
        for t in range(frames.shape[0]):
            frame = av.VideoFrame.from_ndarray(frames[t], format="rgb24")
            frame.pts = self.frames_written
            self.frames_written += 1
            for packet in self.stream.encode(frame):
                self.container.mux(packet)

    def close(self) -> None:
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def encode_video(
    frames: np.ndarray,
    path: str | Path,
    fps: float,
    codec: str = "h264",
    crf: int = 18,
    gop: int = 2,
) -> None:
    """Write (T, H, W, 3) uint8 frames as yuv420p MP4 (H.264 by default, or AV1)."""
    with VideoWriter(path, fps, codec, crf, gop) as w:
        w.write(frames)


class _ContainerCache:
    """Open containers per thread, most recently used kept (files stay open across samples)."""

    def __init__(self, size: int = 256):
        self.size = size
        self.local = threading.local()

    def get(self, path: str) -> av.container.InputContainer:
        # per process too: FFmpeg state inherited through fork (DataLoader workers) deadlocks
        cache: OrderedDict = getattr(self.local, "cache", None)
        if cache is None or getattr(self.local, "pid", None) != os.getpid():
            cache = self.local.cache = OrderedDict()
            self.local.pid = os.getpid()
        c = cache.get(path)
        if c is None:
            c = cache[path] = av.open(path)
            # single-threaded decoding: no FFmpeg threads alive when a DataLoader forks workers
            # (their locks would deadlock the children); parallelism comes from worker processes
            c.streams.video[0].thread_type = "NONE"
            c.streams.video[0].codec_context.thread_count = 1
            if len(cache) > self.size:
                _, old = cache.popitem(last=False)
                old.close()
        else:
            cache.move_to_end(path)
        return c


_containers = _ContainerCache()
_reformatters = threading.local()


# PyAV >= 17 converts with a pool of threads by default: for our small frames the hand-offs cost
# 3x the conversion itself (10x on a busy machine), and threads must not outlive a fork
_SINGLE_THREAD = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """yuv -> rgb24 with a reused, single-threaded reformatter (~15x faster than
    frame.to_ndarray(format=...) here)."""
    r = getattr(_reformatters, "r", None)
    if r is None or getattr(_reformatters, "pid", None) != os.getpid():
        r = _reformatters.r = VideoReformatter()
        _reformatters.pid = os.getpid()
    return r.reformat(frame, format="rgb24", **_SINGLE_THREAD).to_ndarray()


def decode_frames(
    path: str | Path, frames: Sequence[int], fps: float, offset_s: float = 0.0
) -> np.ndarray:
    """Frames at indices `frames` (frame k is at time offset_s + k / fps) as (n, H, W, 3) uint8.

    Seeks to the key frame before the first wanted time, decodes forward to the last one.
    Raises ValueError naming the file when a frame is missing.
    """
    path = str(path)
    wanted = np.asarray(frames, dtype=np.int64)
    if wanted.size == 0:
        raise ValueError("no frames requested")
    targets = sorted(set(wanted.tolist()))
    container = _containers.get(path)
    stream = container.streams.video[0]
    first_t = offset_s + targets[0] / fps
    container.seek(
        max(0, int(first_t / stream.time_base) - 1), stream=stream, backward=True, any_frame=False
    )
    wanted_set = set(targets)
    found: dict[int, np.ndarray] = {}
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        k = int(round((float(frame.pts * stream.time_base) - offset_s) * fps))
        if k in wanted_set and k not in found:
            found[k] = _to_rgb(frame)
        if k >= targets[-1]:
            break
    missing = [k for k in targets if k not in found]
    if missing:
        raise ValueError(
            f"{path}: frames {missing[:5]} not found in the video (offset {offset_s}s, fps {fps})"
        )
    return np.stack([found[int(k)] for k in wanted])


def decode_all(path: str | Path) -> np.ndarray:
    """Every frame of a video, in order, as (T, H, W, 3) uint8."""
    with av.open(str(path)) as container:
        return np.stack([_to_rgb(f) for f in container.decode(video=0)])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between uint8 image stacks (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
