"""The `rdt` family's processor chain: a LIBERO frame -> RDT-1B's model-level inputs, and back.

`build_processor` assembles, in order:

1. `images` (generic): each camera that fills a slot, upright uint8 -> (3, S, S) at the SigLIP
   tower's resolution (crop / colour jitter / camera dropout in training only), the frame's
   earlier images (`image_history`) too, each with its own crop / jitter draw;
2. `rdt.slots`: RDT's image grid, `img_history_size` frames x 3 camera slots, frame-major as
   upstream (`[t-1: exterior, right wrist, left wrist, t: ...]`), uint8 (T * 3, 3, S, S). A slot
   with no camera, a dropped camera and a frame before the episode's start are the *background*
   image (the SigLIP processor's mean colour), as upstream fills missing images (the model gets
   no image mask; `image_mask` says which slots are real);
3. `normalize` (generic) of the 7-d actions (q99 / mean-std, the gripper kept -1 / +1);
4. `rdt.unified`: the 8-d state and the (normalised) 7-d actions into the 128-d unified vector
   (`LiberoUnified`), plus the 0/1 `unified_mask` (1, 128) and `ctrl_freq`; its inverse takes a
   predicted (B, H, 128) chunk back to (B, H, 7), before `normalize`'s inverse;
5. `select`: the model's keys.

The model-level sample: `images` uint8 (T*3, 3, S, S), `image_mask` bool (T*3,), `state` float32
(1, 128), `unified_mask` float32 (1, 128), `ctrl_freq` float32 (), `instruction` str (the key of
the precomputed T5 embedding), and in training `actions` float32 (H, 128), `action_mask` bool (H,).
vlatune's default collate batches it (strings become a list).

History: the processor declares `image_history` = `img_history_size` (2), so a frame carries
the previous frame's images (`image_history` {camera: [uint8 HWC, ...] oldest first}): the
training loader reads frame t - 1 of the same episode (`FrameDataset.frame`), the evaluation
runner renders the env step before each query (`vlatune.eval.runner.run_episode`, a policy server
passes `obs["image_history"]` on). At an episode's start (t = 0, the first query) there is no
earlier frame: its slots are the background with `image_mask` False, upstream's rule in training
(thu-ml/RoboticsDiffusionTransformer data/hdf5_vla_dataset.py pads the history with the first
frame but marks the padding invalid, and train/dataset.py replaces invalid images by the
background image) and at inference (eval_sim/eval_rdt_maniskill.py and
scripts/agilex_inference.py start the 2-observation window with None, drawn as the background).
A processor.json written before `image_history` existed loads with 1: that policy was trained
with a background earlier frame and is evaluated so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vlatune.policies.processor import (
    Images,
    Normalize,
    Processor,
    Select,
    Step,
    declared_conventions,
    register,
)
from vlatune.policies.rdt.unified import STATE_VEC_LEN, LiberoUnified

MODEL_KEYS = (
    "images", "image_mask", "state", "unified_mask", "ctrl_freq", "instruction", "actions",
    "action_mask",
)  # fmt: skip
N_SLOTS = 3  # RDT's camera slots: exterior, right wrist, left wrist


@register
class RDTSlots(Step):
    """Per-camera images (and the frame's `image_history`, already through the `images` step)
    -> RDT's (history x 3 slots) image grid with background fills; declares `image_history`
    = `history` frames."""

    name = "rdt.slots"

    def __init__(
        self,
        camera_slots: Sequence[str | None],
        history: int,
        size: int,
        background: Sequence[int],
    ):
        self.camera_slots = list(camera_slots)
        if len(self.camera_slots) != N_SLOTS:
            raise ValueError(
                f"rdt.slots: camera_slots needs {N_SLOTS} entries (exterior, right wrist, left "
                f"wrist; null for none), got {self.camera_slots}"
            )
        self.history, self.size = int(history), int(size)
        if self.history < 1:
            raise ValueError(f"rdt.slots: history must be at least 1 frame, got {history}")
        self.background = [int(c) for c in background]

    @property
    def image_history(self) -> int:
        return self.history

    def _background(self) -> torch.Tensor:
        bg = torch.tensor(self.background, dtype=torch.uint8).view(3, 1, 1)
        return bg.expand(3, self.size, self.size).clone()

    def __call__(self, sample, rng):
        images, cam_mask = sample["images"], sample.get("image_mask")
        cams = [c for c in self.camera_slots if c is not None]
        kept = {c: True for c in cams}
        if cam_mask is not None:  # the `images` step's order: the slot cameras in slot order
            kept = {c: bool(m) for c, m in zip(cams, cam_mask.tolist(), strict=True)}
        history = sample.pop("image_history", None) or {}
        bg = self._background()
        grid, mask = [], []
        for i in range(self.history):
            back = self.history - 1 - i  # frames before the current one
            for cam in self.camera_slots:
                img = None
                if cam is not None and kept[cam]:
                    if back == 0:
                        img = images[cam]
                    else:
                        past = history.get(cam) or []
                        if len(past) >= back:
                            img = past[len(past) - back]
                            if not isinstance(img, torch.Tensor):  # not through `images`
                                img = _resize(img, self.size)
                grid.append(bg if img is None else img)
                mask.append(img is not None)
        sample["images"] = torch.stack(grid)
        sample["image_mask"] = torch.tensor(mask)
        return sample

    def describe(self) -> str:
        return (
            f"RDT image grid: {self.history} frames x slots {self.camera_slots}, missing ones "
            f"(and frames before the episode's start) the background colour {self.background}"
        )

    def to_json(self, folder):
        return {
            "camera_slots": self.camera_slots,
            "history": self.history,
            "size": self.size,
            "background": self.background,
        }


def _resize(image: np.ndarray, size: int) -> torch.Tensor:
    from vlatune.data.transforms import ImageTransform

    return ImageTransform(size)(np.asarray(image, dtype=np.uint8))


@register
class RDTUnified(Step):
    """LIBERO state / actions <-> RDT's 128-d unified vector (`LiberoUnified`); adds the mask
    and the control frequency."""

    name = "rdt.unified"

    def __init__(self, mapping: dict[str, Any] | LiberoUnified):
        self.mapping = (
            mapping if isinstance(mapping, LiberoUnified) else LiberoUnified.model_validate(mapping)
        )
        self._mask = torch.from_numpy(self.mapping.mask())[None]

    def __call__(self, sample, rng):
        m = self.mapping
        state = sample.get("state")
        if state is None:
            raise KeyError(
                "rdt.unified: the frame has no 'state'; RDT's unified vector needs LIBERO's 8-d "
                "state (eef position, axis-angle, finger qpos)"
            )
        state = np.asarray(state.numpy() if isinstance(state, torch.Tensor) else state)
        sample["state"] = torch.from_numpy(m.state_to_unified(state)[None].astype(np.float32))
        if sample.get("actions") is not None:
            a = sample["actions"]
            a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
            sample["actions"] = torch.from_numpy(m.action_to_unified(a).astype(np.float32))
        sample["unified_mask"] = self._mask.clone()
        sample["ctrl_freq"] = torch.tensor(m.ctrl_freq, dtype=torch.float32)
        return sample

    def inverse(self, chunk):
        if chunk.shape[-1] != STATE_VEC_LEN:
            raise ValueError(
                f"rdt.unified: predicted chunk has {chunk.shape[-1]} dims, expected the "
                f"{STATE_VEC_LEN}-d unified vector"
            )
        return self.mapping.unified_to_action(chunk)

    def describe(self) -> str:
        m = self.mapping
        return (
            f"LIBERO -> 128-d unified: actions at {m.action_indices}, state at "
            f"{m.state_indices}, ctrl_freq {m.ctrl_freq:g} Hz (inverse on predicted chunks)"
        )

    def to_json(self, folder):
        return {"mapping": self.mapping.model_dump()}


def build_processor(
    mapping: LiberoUnified,
    image_size: int,
    background: Sequence[int],
    action_norm,
    horizon: int,
    crop_area: float = 1.0,
    jitter: Sequence[float] = (0.0, 0.0, 0.0),
    camera_dropout: float = 0.0,
    min_cameras: int = 1,
    gripper_dim: int | None = 6,
) -> Processor:
    """The chain above; `image_size` / `background` come from the SigLIP image processor."""
    cameras = [c for c in mapping.camera_slots if c is not None]
    if not cameras:
        raise ValueError("policy.unified.camera_slots: at least one slot needs a camera")
    if gripper_dim is not None and gripper_dim < 0:
        gripper_dim += len(mapping.action)
    steps: list[Step] = [
        Images(cameras, image_size, crop_area, jitter, camera_dropout, min_cameras),
        RDTSlots(mapping.camera_slots, mapping.img_history_size, image_size, background),
        Normalize("actions", action_norm, gripper_dim=gripper_dim),
        RDTUnified(mapping),
        Select(MODEL_KEYS),
    ]
    conventions = declared_conventions(cameras, 8, len(mapping.action), horizon)
    conventions["ctrl_freq"] = mapping.ctrl_freq
    return Processor(steps, conventions)
