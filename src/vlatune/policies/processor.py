"""One processor chain per policy: a frame -> the model's inputs, and a predicted chunk -> env actions.

The same object runs in the training DataLoader workers (`vlatune.data.training.FrameDataset`
calls it on every recorded frame) and in `predict` at evaluation (on every observation), so the
two paths cannot drift apart: tests/test_processor.py feeds one recorded frame through both and
compares the model inputs bit for bit, for every family. It is saved beside the weights as
`processor.json` (plus side files a step writes, e.g. a tokenizer folder) and loaded back with
the policy (openpi's `Group(inputs, outputs)`, LeRobot's pre / post processors).

A **frame** is what every family starts from, with vlatune's conventions already applied where
the data entered (`vlatune.conventions`: upright images, the env's gripper sign):

- `images`: {camera: uint8 (H, W, 3)} at the recorded resolution;
- `state`: float64 (S,) in env units (LIBERO: the 8-d state), absent when the data has none;
- `instruction`: str;
- training only: `actions` float64 (H, A) in env units, the chunk a[t : t + H] padded past the
  episode end by repeating the last action, and `action_mask` bool (H,), False on padding;
- only for a processor that asks for an image history (`Processor.image_history` = n > 1, e.g.
  RDT's 2 frames): `image_history` {camera: [uint8 (H, W, 3), ...]}, the frames t - n + 1 .. t - 1
  of the same episode that exist, oldest first (shorter at an episode's start, empty at t = 0).
  The training loader (`FrameDataset.frame`) and the evaluation runner (`obs["image_history"]`,
  carried by `frame_from_observation`) fill it the same way; a processor with n = 1 never sees it.

A **step** turns the running sample into the next one (`__call__(sample, rng)`), may undo itself
on the model's output (`inverse(chunk)`, applied in reverse order by `postprocess`), says what it
does in one line (`describe`), and is saved by name with its parameters (`to_json` /
`from_json`; names are registered with `@register`). Steps that augment (random crop, colour
jitter, camera dropout) do so only when the processor is in training mode and draw from the
`rng` the caller passes, so a sample is a function of (seed, sample draw): exact resume and
identical batches across worker counts.

    >>> proc = policy.processor                      # built by the family from config + statistics
    >>> sample = proc(frame)                         # evaluation mode: deterministic
    >>> batch = proc.collate([proc(f) for f in frames])
    >>> actions = proc.postprocess(policy.predict_chunk(batch))   # (B, H, A) env units
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROCESSOR_FILE = "processor.json"
FORMAT = "vlatune-processor/1"

STEPS: dict[str, type[Step]] = {}


def register(cls: type[Step]) -> type[Step]:
    """Class decorator: a step saved under `cls.name` (unique across families)."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in STEPS and STEPS[cls.name] is not cls:
        raise ValueError(f"processor step name '{cls.name}' is registered twice")
    STEPS[cls.name] = cls
    return cls


class Step:
    """Base of processor steps: identity with no parameters."""

    name = ""
    train = False  # set by Processor.training(); only augmenting steps read it
    image_history = 1  # consecutive frames (the current one included) the step reads

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        return sample

    def inverse(self, chunk: np.ndarray) -> np.ndarray:
        return chunk

    def describe(self) -> str:
        return self.name

    def counters(self) -> dict[str, int]:
        """Fallback counters of this step (vlatune.eval.policies: `fallbacks()`)."""
        return {}

    def to_json(self, folder: Path) -> dict[str, Any]:
        """The step's parameters; side files go under `folder` (the processor's folder)."""
        return {}

    @classmethod
    def from_json(cls, d: dict[str, Any], folder: Path) -> Step:
        return cls(**d)


class Processor:
    """An ordered chain of steps with the conventions of the frames it accepts.

    `image_history`: how many consecutive frames (the current one included) a frame should
    carry images of; by default the largest a step declares (`Step.image_history`, e.g.
    `rdt.slots`' `history`). It is saved in processor.json; a file without it was written when
    frames carried the current images only, and loads with 1 (the policy is evaluated as it was
    trained)."""

    def __init__(
        self,
        steps: Sequence[Step],
        conventions: dict[str, Any],
        collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        image_history: int | None = None,
    ):
        self.steps = list(steps)
        self.conventions = dict(conventions)
        self._collate = collate_fn
        self.is_training = False
        if image_history is None:
            image_history = max([int(getattr(s, "image_history", 1)) for s in self.steps] or [1])
        if int(image_history) < 1:
            raise ValueError(f"image_history must be at least 1 (frames), got {image_history}")
        self.image_history = int(image_history)

    # ---- running
    def __call__(
        self, frame: dict[str, Any], rng: np.random.Generator | None = None
    ) -> dict[str, Any]:
        """One frame -> one model sample (tensors without the batch dimension). The frame is
        not modified."""
        sample = dict(frame)
        if self.is_training and rng is None:
            rng = np.random.default_rng()
        for step in self.steps:
            sample = step(sample, rng)
        return sample

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Samples -> a batch (the family's collate where it needs one, else vlatune's)."""
        if self._collate is not None:
            return self._collate(samples)
        from vlatune.data.training import collate

        return collate(samples)

    def postprocess(self, chunk: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, H, model action dim) in model units -> (B, H, A) float64 env units: the steps'
        inverses, last step first."""
        out = chunk.detach().float().cpu().numpy() if isinstance(chunk, torch.Tensor) else chunk
        out = np.asarray(out, dtype=np.float64)
        for step in reversed(self.steps):
            out = step.inverse(out)
        return out

    def training(self, on: bool = True) -> Processor:
        """A copy in training (augmenting) or evaluation mode; the original is unchanged."""
        other = copy.copy(self)
        other.steps = [copy.copy(s) for s in self.steps]
        for s in other.steps:
            s.train = on
        other.is_training = on
        return other

    def fallbacks(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for step in self.steps:
            for k, v in step.counters().items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def describe(self) -> list[str]:
        return [f"{i + 1}. {s.describe()}" for i, s in enumerate(self.steps)]

    # ---- saving
    def save(self, folder: str | Path) -> Path:
        """`processor.json` (+ side files) in `folder` (a policy folder being written)."""
        from vlatune.fsutil import write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": FORMAT,
            "conventions": self.conventions,
            "image_history": self.image_history,
            "steps": [{"step": s.name, **s.to_json(folder)} for s in self.steps],
        }
        write_json(folder / PROCESSOR_FILE, doc)
        return folder / PROCESSOR_FILE

    @classmethod
    def load(cls, folder: str | Path, collate_fn=None) -> Processor:
        folder = Path(folder)
        file = folder / PROCESSOR_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"{folder}: no {PROCESSOR_FILE}; the policy cannot prepare observations the way "
                "it was trained without it (save the policy with this vlatune version)"
            )
        doc = json.loads(file.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"{file}: key 'format' is {doc.get('format')!r}, expected {FORMAT!r}")
        steps = []
        for i, entry in enumerate(doc["steps"]):
            entry = dict(entry)
            name = entry.pop("step", None)
            if name not in STEPS:
                _import_family_steps(name)
            if name not in STEPS:
                raise ValueError(
                    f"{file}: key 'steps[{i}].step' is {name!r}, not a known processor step "
                    f"(known: {sorted(STEPS)})"
                )
            steps.append(STEPS[name].from_json(entry, folder))
        history = doc.get("image_history", 1)  # files written before the key: current frame only
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(
                f"{file}: key 'image_history' is {history!r}, expected an integer >= 1 (the "
                "number of consecutive frames a frame carries images of)"
            )
        if (
            collate_fn is None
        ):  # a step that shapes the batch (composed hf-vlm, rdt-style) brings its collate
            collate_fn = next(
                (s.collate for s in steps if callable(getattr(s, "collate", None))), None
            )
        return cls(steps, doc.get("conventions", {}), collate_fn, image_history=history)


def _import_family_steps(name: str | None) -> None:
    """Steps named "<family>.<step>" live in vlatune.policies.<family>.processor."""
    if not name or "." not in name:
        return
    import importlib.util

    family = name.split(".")[0]
    if importlib.util.find_spec(f"vlatune.policies.{family}") is None:
        return  # not a family: the caller's "not a known processor step" names it
    importlib.import_module(f"vlatune.policies.{family}.processor")  # its errors as they are


def frame_from_observation(
    obs: dict[str, Any], cameras: Sequence[str], history: int = 1
) -> dict[str, Any]:
    """An evaluation observation (`vlatune.keys`: upright uint8 images, 8-d state, instruction)
    -> a frame; a camera the policy needs and the observation lacks is an error naming both.

    With `history` = n > 1 (the processor's `image_history`) the frame carries `image_history`
    {camera: [the last n - 1 earlier images, oldest first]} from `obs["image_history"]` (what
    the evaluation runner renders); an observation without it, or with fewer earlier frames
    (an episode's first query), has none of them: the processor treats them as frames before the
    episode's start, as in training. With n = 1 the key is never carried."""
    images = obs.get("images") or {}
    missing = [c for c in cameras if c not in images]
    if missing:
        raise KeyError(
            f"observation lacks camera(s) {missing} (has {sorted(images)}); the policy was "
            f"trained on {list(cameras)}"
        )
    frame: dict[str, Any] = {
        "images": {c: np.asarray(images[c], dtype=np.uint8) for c in cameras},
        "instruction": str(obs.get("instruction", "")),
    }
    if obs.get("state") is not None:
        frame["state"] = np.asarray(obs["state"], dtype=np.float64)
    if history > 1:
        past = obs.get("image_history") or {}
        frame["image_history"] = {
            c: [np.asarray(img, dtype=np.uint8) for img in list(past.get(c) or [])][
                -(history - 1) :
            ]
            for c in cameras
        }
    return frame


def batch_to_device(batch: Any, device: torch.device | str) -> Any:
    """Tensors (nested in dicts / lists) moved to `device`; everything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: batch_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list) and batch and isinstance(batch[0], torch.Tensor):
        return [batch_to_device(v, device) for v in batch]
    return batch


# ---------------------------------------------------------------------------- common steps
@register
class Images(Step):
    """uint8 (H, W, 3) per camera -> uint8 (3, S, S) (`vlatune.data.transforms.ImageTransform`:
    crop keeping `crop_area` of the area, centred at evaluation and random in training, colour
    jitter in training) and `image_mask` (n_cameras,) bool. Camera dropout (training): each camera
    is dropped with probability `dropout` (at least `min_cameras` kept), its image all zeros.

    A frame's `image_history` (earlier frames, see the module docstring) goes through the same
    transform, each image with its own crop / jitter draw after the current images' (RDT's
    train/dataset.py augments every image of its history independently); a dropped camera's
    history is left out (dropped in every frame). Without the key nothing else changes."""

    name = "images"

    def __init__(
        self,
        cameras: Sequence[str],
        size: int,
        crop_area: float = 1.0,
        jitter: Sequence[float] = (0.0, 0.0, 0.0),
        dropout: float = 0.0,
        min_cameras: int = 1,
    ):
        from vlatune.data.transforms import ImageTransform

        self.cameras, self.size, self.crop_area = list(cameras), int(size), float(crop_area)
        self.jitter, self.dropout = tuple(float(j) for j in jitter), float(dropout)
        self.min_cameras = min(int(min_cameras), len(self.cameras))
        self._transform = ImageTransform(self.size, crop_area=self.crop_area)

    def _keep(self, rng: np.random.Generator) -> list[bool]:
        n = len(self.cameras)
        if not self.train or self.dropout <= 0:
            return [True] * n
        keep = rng.random(n) >= self.dropout
        if keep.sum() < self.min_cameras:  # restore random dropped cameras up to the minimum
            dropped = np.flatnonzero(~keep)
            rng.shuffle(dropped)
            keep[dropped[: self.min_cameras - int(keep.sum())]] = True
        return keep.tolist()

    def __call__(self, sample, rng):
        t = self._transform
        t.train = self.train
        t.brightness, t.contrast, t.saturation = self.jitter if self.train else (0.0, 0.0, 0.0)
        if self.train:
            t.rng = rng
        keep = self._keep(rng)
        frames = sample["images"]
        images = {}
        for cam, on in zip(self.cameras, keep, strict=True):
            if cam not in frames:
                raise KeyError(f"frame lacks camera '{cam}' (has {sorted(frames)})")
            if on:
                images[cam] = t(frames[cam])
            else:
                images[cam] = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
        sample["images"] = images
        sample["image_mask"] = torch.tensor(keep)
        history = sample.get("image_history")
        if history is not None:
            sample["image_history"] = {
                cam: [t(img) for img in history.get(cam) or []]
                for cam, on in zip(self.cameras, keep, strict=True)
                if on
            }
        return sample

    def describe(self) -> str:
        aug = f", jitter {self.jitter}, camera dropout {self.dropout}" if any(self.jitter) else ""
        return (
            f"images {self.cameras}: crop {self.crop_area:g} of the area (centred; random in "
            f"training{aug}), resize to {self.size}x{self.size} uint8"
        )

    def to_json(self, folder):
        return {
            "cameras": self.cameras,
            "size": self.size,
            "crop_area": self.crop_area,
            "jitter": list(self.jitter),
            "dropout": self.dropout,
            "min_cameras": self.min_cameras,
        }


@register
class Normalize(Step):
    """`key` ("state" or "actions") through a `Normalizer` (q99 or mean / std; the gripper
    dimension kept), as float32. For "actions", `inverse` undoes it on predicted chunks: with q99
    the prediction is clipped to the training range [-1, 1] first (a clip beyond
    `CLIP_TOLERANCE` counts as the fallback `clipped_actions`, once per query), and the gripper
    dimension becomes its sign (-1 / +1)."""

    name = "normalize"
    CLIP_TOLERANCE = 0.01

    def __init__(
        self, key: str, normalizer, gripper_dim: int | None = None, dim: int | None = None
    ):
        if key not in ("state", "actions"):
            raise ValueError(f"normalize: key must be 'state' or 'actions', got {key!r}")
        self.key, self.norm, self.gripper_dim = key, normalizer, gripper_dim
        self.dim = dim if dim is not None else len(normalizer.low)
        self.clipped = 0

    def __call__(self, sample, rng):
        x = sample.get(self.key)
        if x is None:
            return sample
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"{self.key} has {x.shape[-1]} dims, the policy expects {self.dim} "
                "(its normalisation statistics)"
            )
        sample[self.key] = torch.from_numpy(self.norm(x))
        return sample

    def inverse(self, chunk):
        if self.key != "actions":
            return chunk
        g = self.gripper_dim
        if self.norm.mode == "q99":
            values = chunk if g is None else np.delete(chunk, g, axis=-1)
            outside = np.abs(values) > 1.0 + self.CLIP_TOLERANCE
            self.clipped += int(outside.reshape(len(chunk), -1).any(axis=1).sum())
            clipped = np.clip(chunk, -1.0, 1.0)
        else:
            clipped = chunk
        actions = self.norm.inverse(clipped)
        if g is not None:
            actions[..., g] = np.where(chunk[..., g] > 0, 1.0, -1.0)
        return actions

    def counters(self):
        return {"clipped_actions": self.clipped} if self.key == "actions" else {}

    def describe(self) -> str:
        keep = f", dims {list(self.norm.keep_dims)} kept" if self.norm.keep_dims else ""
        return f"normalise {self.key} ({self.norm.mode}{keep}); inverse on predicted actions"

    def to_json(self, folder):
        return {
            "key": self.key,
            "normalizer": self.norm.to_json(),
            "gripper_dim": self.gripper_dim,
            "dim": self.dim,
        }

    @classmethod
    def from_json(cls, d, folder):
        from vlatune.data.transforms import Normalizer

        return cls(
            d["key"], Normalizer.from_json(d["normalizer"]), d.get("gripper_dim"), d.get("dim")
        )


@register
class PadVector(Step):
    """Zero-pad `key` on its last axis to `size` (pi0: 32; GR00T: 64 / 32), adding
    `<key>_pad_mask` (True on real dims) when `mask` is set; `inverse` cuts predicted actions
    back to `original` dims."""

    name = "pad"

    def __init__(self, key: str, size: int, original: int, mask: bool = False):
        self.key, self.size, self.original, self.mask = key, int(size), int(original), bool(mask)
        if self.original > self.size:
            raise ValueError(f"pad: {key} has {original} dims, more than the model's {size}")

    def __call__(self, sample, rng):
        x = sample.get(self.key)
        if x is None:
            return sample
        x = torch.as_tensor(x)
        if x.shape[-1] != self.original:
            raise ValueError(
                f"{self.key} has {x.shape[-1]} dims, the processor expects {self.original}"
            )
        sample[self.key] = torch.nn.functional.pad(x, (0, self.size - self.original))
        if self.mask:
            m = torch.zeros(self.size, dtype=torch.bool)
            m[: self.original] = True
            sample[f"{self.key}_pad_mask"] = m
        return sample

    def inverse(self, chunk):
        if self.key != "actions":
            return chunk
        return chunk[..., : self.original]

    def describe(self) -> str:
        return f"zero-pad {self.key} {self.original} -> {self.size} (cut back on predicted actions)"

    def to_json(self, folder):
        return {"key": self.key, "size": self.size, "original": self.original, "mask": self.mask}


@register
class Select(Step):
    """Keep only `keys` of the sample (what the model and the loop read), dropping the rest
    (e.g. the raw state of a policy trained without one)."""

    name = "select"

    def __init__(self, keys: Sequence[str]):
        self.keys = list(keys)

    def __call__(self, sample, rng):
        return {k: v for k, v in sample.items() if k in self.keys}

    def describe(self) -> str:
        return f"keep {self.keys}"

    def to_json(self, folder):
        return {"keys": self.keys}


SAMPLE_KEYS = (
    "images",
    "image_mask",
    "state",
    "actions",
    "action_mask",
    "instruction",
    "episode",
    "frame",
)


def composed_processor(
    cameras: Sequence[str],
    image_size: int,
    action_norm,
    state_norm=None,
    crop_area: float = 1.0,
    jitter: Sequence[float] = (0.0, 0.0, 0.0),
    camera_dropout: float = 0.0,
    min_cameras: int = 1,
    gripper_dim: int | None = None,
    horizon: int = 8,
) -> Processor:
    """The composed family's chain (and `FrameDataset`'s default): images, state, actions."""
    state_dim = len(state_norm.low) if state_norm is not None else None
    steps: list[Step] = [
        Images(cameras, image_size, crop_area, jitter, camera_dropout, min_cameras)
    ]
    if state_norm is not None:
        steps.append(Normalize("state", state_norm))
    steps.append(Normalize("actions", action_norm, gripper_dim=gripper_dim))
    keys = [k for k in SAMPLE_KEYS if k != "state" or state_norm is not None]
    steps.append(Select(keys))
    conventions = declared_conventions(cameras, state_dim, len(action_norm.low), horizon)
    return Processor(steps, conventions)


def declared_conventions(
    cameras: Sequence[str], state_dim: int | None, action_dim: int, horizon: int
) -> dict[str, Any]:
    """What a policy trained on vlatune frames expects of the env: frames are converted to the
    env's conventions where data enters (`vlatune.data.training`), so upright images and the
    env's gripper sign; an 8-d state is LIBERO's layout."""
    from vlatune.conventions import ENV_CONVENTIONS

    return {
        "image_orientation": ENV_CONVENTIONS["image_orientation"],
        "gripper": ENV_CONVENTIONS["gripper"],
        "state": ENV_CONVENTIONS["state"] if state_dim == 8 else f"custom_{state_dim}d",
        "action_dim": action_dim,
        "action_horizon": horizon,
        "cameras": list(cameras),
        "normalization_stats": True,
    }


class ProcessedPolicy:
    """The `vlatune eval` / `vlatune serve` interface (vlatune.eval.policies) for a family
    module that has `processor` (a `Processor` whose conventions name its `cameras`) and
    `predict_chunk` (the policy interface): observation -> frame -> the same processor the
    training loader ran (evaluation mode) -> batch -> chunk -> `processor.postprocess` -> env
    actions. Mix it into a family's policy class before `nn.Module`."""

    needs_images = True

    @property
    def conventions(self) -> dict[str, Any]:
        return dict(self.processor.conventions)

    @property
    def image_history(self) -> int:
        """Consecutive frames an observation should carry (the runner renders the earlier
        ones into `obs["image_history"]` when > 1)."""
        return int(getattr(self.processor, "image_history", 1))

    def reset(self, ctx) -> None:  # stateless between queries
        return None

    def observation_batch(self, observations: Sequence[dict[str, Any]]) -> dict[str, Any]:
        cameras = self.processor.conventions.get("cameras", [])
        proc = self.processor if not self.processor.is_training else self.processor.training(False)
        history = self.image_history
        if history > 1:  # no earlier frames given: they are drawn as at an episode's start
            missing = sum("image_history" not in o for o in observations)
            self._missing_history = getattr(self, "_missing_history", 0) + missing
        samples = [proc(frame_from_observation(o, cameras, history)) for o in observations]
        device = next(self.parameters()).device
        return batch_to_device(proc.collate(samples), device)

    @torch.no_grad()
    def predict(self, obs: dict[str, Any] | Sequence[dict[str, Any]]) -> np.ndarray:
        """(H, A) env actions for one observation, (B, H, A) for a list."""
        single = isinstance(obs, dict)
        observations = [obs] if single else list(obs)
        was_training = self.training
        self.eval()
        try:
            chunk = self.predict_chunk(self.observation_batch(observations))
        finally:
            self.train(was_training)
        actions = self.processor.postprocess(chunk)
        return actions[0] if single else actions

    def predict_batch(self, observations: Sequence[dict[str, Any]]) -> np.ndarray:
        return self.predict(list(observations))

    def fallbacks(self) -> dict[str, int]:
        """The processor's counters, the model's (`model_fallbacks`) and, for a policy reading
        earlier frames, `missing_image_history`: observations that carried no
        `image_history` key (the runner always sends one, empty at an episode's first query),
        answered with the earlier frames drawn as before an episode's start."""
        out = self.processor.fallbacks()
        if self.image_history > 1:
            out["missing_image_history"] = getattr(self, "_missing_history", 0)
        own = getattr(self, "model_fallbacks", None)
        for k, v in (own() if own else {}).items():
            out[k] = out.get(k, 0) + int(v)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "policy": type(self).__name__,
            "processor": self.processor.describe(),
            "path": getattr(self, "source", None),
        }
