"""The training view: a torch Dataset over (episode, t) of any dataset vlatune reads.

One sample (the batch contract; shapes per sample, a DataLoader adds the batch dimension):

- `images`: {camera: uint8 (3, S, S)}, upright (the env convention); models divide by 255
  per batch;
- `image_mask`: bool (n_cameras,), False for a camera dropped by camera dropout (its image is 0);
- `state`: float32 (S,) normalised;
- `actions`: float32 (H, A) normalised, the chunk a[t : t + H], padded past the episode end
  by repeating the last action; `action_mask`: bool (H,), False on padding (no loss there);
- `instruction`: str; `episode`, `frame`: int; plus annotation fields joined by (episode, frame).

A processor that asks for an image history (`processor.image_history` = n > 1, RDT's 2 frames)
gets the frames t - n + 1 .. t - 1 of the same episode as well (`frame(k)["image_history"]`,
upright, same cameras and resolution; fewer at the episode's start, see
`vlatune.policies.processor`); other processors read nothing more.

Conventions are converted here, once: frames are rotated when the dataset declares them raw,
the gripper dimension is mapped to the env's (-1 open, +1 close), statistics come from the
stats file (computed on the training episodes), the gripper dimension is not normalised.

    >>> ds = FrameDataset.from_config("data/libero_object", cfg.data, stats, episodes=split["train"])
    >>> sample = ds[0]; sample["actions"].shape   # (8, 7)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlatune.conventions import gripper_to_env, to_upright
from vlatune.data.episode import DataError, DatasetReader
from vlatune.data.io import open_dataset
from vlatune.data.transforms import Normalizer


def normalizers_from_stats(data_cfg, stats: dict[str, Any]) -> tuple[Normalizer, Normalizer | None]:
    """The action and state normalisers of a data config (the one definition: datasets and
    policies both use it). The gripper dimension is left unnormalised."""
    keep = [] if data_cfg.gripper_dim is None else [data_cfg.gripper_dim]
    a_norm = Normalizer.from_stats(stats["action"], data_cfg.normalization, keep_dims=keep)
    s_norm = (
        Normalizer.from_stats(stats["state"], data_cfg.normalization) if "state" in stats else None
    )
    return a_norm, s_norm


class FrameDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        path: str | Path,
        action_normalizer: Normalizer,
        state_normalizer: Normalizer | None,
        cameras: Sequence[str],
        image_size: int = 224,
        horizon: int = 8,
        episodes: Sequence[int] | None = None,
        train: bool = True,
        crop_area: float = 1.0,
        jitter: tuple[float, float, float] = (0.0, 0.0, 0.0),
        camera_dropout: float = 0.0,
        min_cameras: int = 1,
        image_orientation: str = "auto",
        gripper: str = "auto",
        gripper_dim: int | None = -1,
        annotations: Mapping[tuple[int, int], dict[str, Any]] | None = None,
        format: str = "auto",
        mapping: str | Path | None = None,
        seed: int = 0,
        cache_images: bool = False,
        processor=None,
    ):
        """`processor` (a policy's `vlatune.policies.processor.Processor`) turns each frame
        into model inputs; by default the composed family's chain built from the arguments
        above (images, normalised state and actions). It runs in training mode when `train`."""
        self.path, self.format, self.mapping = Path(path), format, mapping
        self.cache_images = cache_images
        self._frames: dict[tuple[int, str], np.ndarray] = {}
        self._reader: DatasetReader | None = None
        reader = self.reader
        info = reader.info
        unknown = [c for c in cameras if c not in info.cameras]
        if unknown:
            raise DataError(
                f"camera(s) {unknown} not in the dataset (cameras: {info.cameras})", file=self.path
            )
        self.cameras = list(cameras)
        self.orientation = (
            info.image_orientation if image_orientation == "auto" else image_orientation
        )
        self.gripper = info.gripper if gripper == "auto" else gripper
        self.gripper_dim = gripper_dim
        self.horizon = horizon
        self.train = train
        self.camera_dropout = camera_dropout if train else 0.0
        self.min_cameras = min(min_cameras, len(self.cameras))
        self.action_norm, self.state_norm = action_normalizer, state_normalizer
        self.annotations = annotations or {}
        self.seed = seed
        self.episodes = list(range(len(reader))) if episodes is None else [int(e) for e in episodes]
        lengths = np.array([reader.episode_length(e) for e in self.episodes], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        if processor is None:
            from vlatune.policies.processor import composed_processor

            processor = composed_processor(
                self.cameras,
                image_size,
                action_normalizer,
                state_normalizer,
                crop_area=crop_area,
                jitter=jitter,
                camera_dropout=camera_dropout,
                min_cameras=min_cameras,
                gripper_dim=gripper_dim,
                horizon=horizon,
            )
        self.processor = processor.training(train)
        self._rng = np.random.default_rng(seed)
        self._lowdim: OrderedDict[int, tuple[np.ndarray, np.ndarray | None, str]] = OrderedDict()

    @classmethod
    def from_config(
        cls,
        path,
        data_cfg,
        stats: dict[str, Any],
        episodes=None,
        train: bool = True,
        annotations=None,
        seed: int = 0,
        mapping=None,
        action_norm: Normalizer | None = None,
        state_norm: Normalizer | None = None,
        processor=None,
    ) -> FrameDataset:
        """Normalisers come from `stats`, or are given (a policy's, when resuming); a
        `processor` (the policy's) replaces the default chain."""
        a_norm, s_norm = action_norm, state_norm
        if a_norm is None:
            a_norm, s_norm = normalizers_from_stats(data_cfg, stats)
        aug = data_cfg.augment
        return cls(
            path,
            a_norm,
            s_norm,
            data_cfg.cameras,
            image_size=data_cfg.image_size,
            horizon=data_cfg.action_horizon,
            episodes=episodes,
            train=train,
            crop_area=aug.crop_area if aug.enabled else 1.0,
            jitter=(aug.brightness, aug.contrast, aug.saturation)
            if aug.enabled
            else (0.0, 0.0, 0.0),
            camera_dropout=data_cfg.camera_dropout,
            min_cameras=data_cfg.min_cameras,
            image_orientation=data_cfg.image_orientation,
            gripper=data_cfg.gripper,
            gripper_dim=data_cfg.gripper_dim,
            annotations=annotations,
            format=data_cfg.format,
            mapping=mapping,
            seed=seed,
            cache_images=data_cfg.cache_images,
            processor=processor,
        )

    # a reader per process: h5py and PyAV handles must not cross a DataLoader worker fork
    @property
    def reader(self) -> DatasetReader:
        if self._reader is None:
            self._reader = open_dataset(self.path, format=self.format, mapping=self.mapping)
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None
        state["_lowdim"] = OrderedDict()
        state["_frames"] = {}
        return state

    def __len__(self) -> int:
        return int(self._starts[-1])

    def episode_frames(self, ep: int, cam: str, t: int) -> np.ndarray:
        """Frame t of a camera, upright; from memory when `cache_images` is on."""
        if not self.cache_images:
            frame = self.reader.read_frames(ep, cam, [t])[0]
            return to_upright(frame) if self.orientation == "raw" else frame
        key = (ep, cam)
        frames = self._frames.get(key)
        if frames is None:  # decode the whole episode once, sequentially (fast for video)
            T = self.reader.episode_length(ep)
            frames = self.reader.read_frames(ep, cam, list(range(T)))
            if self.orientation == "raw":
                frames = np.ascontiguousarray(to_upright(frames))
            self._frames[key] = frames
        return frames[t]

    def locate(self, k: int) -> tuple[int, int]:
        """Sample index -> (position in self.episodes, frame)."""
        if not 0 <= k < len(self):
            raise IndexError(k)
        pos = int(np.searchsorted(self._starts, k, side="right") - 1)
        return pos, int(k - self._starts[pos])

    def _episode_lowdim(self, ep: int) -> tuple[np.ndarray, np.ndarray | None, str]:
        hit = self._lowdim.get(ep)
        if hit is None:
            e = self.reader.load_episode(ep, cameras=[])
            actions = np.asarray(e.actions, np.float64).copy()
            if self.gripper_dim is not None:
                actions[:, self.gripper_dim] = gripper_to_env(
                    actions[:, self.gripper_dim], self.gripper
                )
            hit = (actions, e.states, e.instruction)
            self._lowdim[ep] = hit
            if len(self._lowdim) > 4096:
                self._lowdim.popitem(last=False)
        return hit

    def use_processor(self, processor) -> None:
        """Run `processor` (the policy's) on every frame from now on, in this dataset's mode."""
        self.processor = processor.training(self.train)

    def frame(self, k: int) -> dict[str, Any]:
        """Sample k as a frame (`vlatune.policies.processor`): upright uint8 images at the
        recorded size, state and action chunk in env units (gripper converted), before any
        processing. When the processor asks for n > 1 frames (`image_history`), also
        `image_history` {camera: [frames max(0, t - n + 1) .. t - 1]}, oldest first."""
        pos, t = self.locate(k)
        ep = self.episodes[pos]
        actions, states, instruction = self._episode_lowdim(ep)
        T = len(actions)
        idx = np.arange(t, t + self.horizon)
        frame: dict[str, Any] = {
            "images": {cam: self.episode_frames(ep, cam, t) for cam in self.cameras},
            "instruction": instruction,
            "actions": actions[np.minimum(idx, T - 1)],
            "action_mask": torch.from_numpy(idx < T),
            "episode": ep,
            "frame": t,
        }
        if states is not None:
            frame["state"] = np.asarray(states[t], np.float64)
        n = int(getattr(self.processor, "image_history", 1))
        if n > 1:
            earlier = range(max(0, t - n + 1), t)
            frame["image_history"] = {
                cam: [self.episode_frames(ep, cam, j) for j in earlier] for cam in self.cameras
            }
        return frame

    def __getitem__(self, k: int) -> dict[str, Any]:
        """Sample k % len(self): `frame(k)` through the processor. Augmentation (crop, jitter,
        camera dropout) is drawn from a generator seeded by (seed, k), so a sampler that
        numbers epochs (k = epoch * len + i) gets fresh augmentation each epoch, identical
        across worker counts and resumes."""
        draw = int(k)
        k = draw % len(self)
        if self.train:
            self._rng = np.random.default_rng([self.seed, draw])
        frame = self.frame(k)
        sample = self.processor(frame, self._rng)
        sample.update(self.annotations.get((frame["episode"], frame["frame"]), {}))
        return sample

    def instructions(self) -> list[str]:
        """The distinct instructions of this split's episodes."""
        return sorted({self._episode_lowdim(ep)[2] for ep in self.episodes})

    def action_chunks(self, limit: int = 20000) -> list[np.ndarray]:
        """Normalised action chunks (H, A) of up to `limit` evenly spread samples (what a FAST
        tokenizer is fitted on); no images are read."""
        n = len(self)
        picks = np.unique(np.linspace(0, n - 1, min(n, limit)).astype(np.int64))
        out = []
        for k in picks:
            pos, t = self.locate(int(k))
            actions = self._episode_lowdim(self.episodes[pos])[0]
            idx = np.minimum(np.arange(t, t + self.horizon), len(actions) - 1)
            out.append(self.action_norm(actions[idx]))
        return out


def worker_init(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream."""
    info = torch.utils.data.get_worker_info()
    if info is not None:
        ds = info.dataset
        ds._rng = np.random.default_rng([ds.seed, worker_id, info.seed % (2**32)])


LISTED = ("reasoning", "flow_tokens")  # per-sample annotations, possibly absent: kept as lists


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """`default_collate`, except the annotations some samples lack, kept as per-sample lists."""
    listed = {k: [s.pop(k, None) for s in samples] for k in LISTED if any(k in s for s in samples)}
    batch = torch.utils.data.default_collate(samples)
    batch.update(listed)
    return batch


def make_loader(
    ds: FrameDataset,
    batch_size: int | None = None,
    num_workers: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    batch_sampler=None,
    persistent_workers: bool = False,
):
    """The one DataLoader builder for a FrameDataset (`vlatune train` and the benchmark use it).

    `batch_sampler` (the trainer's `StepBatchSampler`) replaces batch_size / shuffle /
    drop_last. Workers start through `forkserver`: a clean process with no FFmpeg or HDF5 state
    forks them, so video decoding in the parent (evaluation, statistics, a workers=0 run) can
    never deadlock them. The loader has its own generator: one draws a seed when iterated,
    which must not consume the global stream (dropout, noise) that a resumed run restores.
    `persistent_workers` keeps workers across passes (a loader iterated more than once)."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    processor = getattr(ds, "processor", None)  # the policy's chain: its own collate
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = {
            "multiprocessing_context": "forkserver",
            "worker_init_fn": worker_init,
            "persistent_workers": persistent_workers,
        }
    if batch_sampler is not None:
        kwargs["batch_sampler"] = batch_sampler
    else:
        kwargs.update(batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)
    return torch.utils.data.DataLoader(
        ds,
        num_workers=num_workers,
        collate_fn=processor.collate if processor is not None else collate,
        pin_memory=torch.cuda.is_available(),
        generator=gen,
        **kwargs,
    )
