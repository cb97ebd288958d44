"""Configuration of the pi0 family (pi0 and pi0.5), with the released defaults.

Follows LeRobot's `PI0Config` / `PI05Config` (lerobot >= 0.5, the PyTorch port of openpi): the
fields that LeRobot writes into a policy's `config.json` keep LeRobot's names and defaults, and the
sizes behind the variant names `gemma_2b` / `gemma_300m` (which `config.json` does not carry) live
in `GemmaSpec` / `VisionSpec`. A folder may override those sizes with a `reference_arch.json`
(the format of `../shared/reference/pi0/reference_arch.json`): that is how tiny checkpoints load.

    >>> cfg = Pi0Config.from_lerobot(json.loads(Path("config.json").read_text()))
    >>> cfg.variant, cfg.vlm.width, cfg.expert.width
    ('pi0', 2048, 1024)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GemmaSpec(_Strict):
    """One Gemma stack (openpi `gemma.py: Config`)."""

    width: int = Field(gt=0)
    depth: int = Field(gt=0)
    mlp_dim: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)


class VisionSpec(_Strict):
    """SigLIP vision tower (PaliGemma's so400m/14 by default)."""

    hidden_size: int = Field(1152, gt=0)
    intermediate_size: int = Field(4304, gt=0)
    num_hidden_layers: int = Field(27, gt=0)
    num_attention_heads: int = Field(16, gt=0)
    patch_size: int = Field(14, gt=0)


# openpi `gemma.py: get_config`, as LeRobot's `get_gemma_config`.
GEMMA_VARIANTS: dict[str, GemmaSpec] = {
    "gemma_2b": GemmaSpec(
        width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256
    ),
    "gemma_300m": GemmaSpec(
        width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256
    ),
}
PALIGEMMA_VOCAB = 257_152
ARCH_FILES = ("pi0_arch.json", "reference_arch.json")  # ours first, then the fixtures' name


class Pi0Config(_Strict):
    """Both variants: `variant="pi0"` (state token, action-time MLP) or `"pi05"` (adaRMS time)."""

    type: Literal["pi0"] = "pi0"
    variant: Literal["pi0", "pi05"] = "pi0"
    paligemma_variant: str = "gemma_2b"
    action_expert_variant: str = "gemma_300m"
    vlm: GemmaSpec = Field(default_factory=lambda: GEMMA_VARIANTS["gemma_2b"])
    expert: GemmaSpec = Field(default_factory=lambda: GEMMA_VARIANTS["gemma_300m"])
    vision: VisionSpec = Field(default_factory=VisionSpec)
    vocab_size: int = Field(PALIGEMMA_VOCAB, gt=0)
    image_size: int = Field(224, gt=0, description="square SigLIP input (LeRobot image_resolution)")
    num_cameras: int = Field(1, gt=0)
    state_dim: int = Field(
        8, gt=0, description="unpadded state size (pi0: state token; pi0.5: prompt)"
    )
    action_dim: int = Field(7, gt=0, description="unpadded action size")
    chunk_size: int = Field(50, gt=0)
    n_action_steps: int = Field(50, gt=0)
    max_state_dim: int = Field(32, gt=0)
    max_action_dim: int = Field(32, gt=0)
    num_inference_steps: int = Field(10, gt=0)
    time_sampling_beta_alpha: float = 1.5
    time_sampling_beta_beta: float = 1.0
    time_sampling_scale: float = 0.999
    time_sampling_offset: float = 0.001
    min_period: float = 4e-3
    max_period: float = 4.0
    tokenizer_max_length: int = Field(48, gt=0, description="pi0: 48, pi0.5: 200")
    dtype: Literal["float32", "bfloat16"] = "float32"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    lerobot_config: dict[str, Any] | None = Field(
        None, description="the LeRobot config.json this came from (written back on save)"
    )

    @model_validator(mode="after")
    def _check(self) -> Pi0Config:
        if self.n_action_steps > self.chunk_size:
            raise ValueError(
                f"n_action_steps ({self.n_action_steps}) > chunk_size ({self.chunk_size})"
            )
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            if getattr(self.vlm, name) != getattr(self.expert, name):
                raise ValueError(
                    f"joint attention needs the same {name} in the VLM ({getattr(self.vlm, name)}) and the "
                    f"action expert ({getattr(self.expert, name)})"
                )
        if self.vlm.num_heads % self.vlm.num_kv_heads:
            raise ValueError(f"num_heads {self.vlm.num_heads} is not a multiple of num_kv_heads")
        if self.image_size % self.vision.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.vision.patch_size}"
            )
        if self.state_dim > self.max_state_dim or self.action_dim > self.max_action_dim:
            raise ValueError(
                f"state_dim {self.state_dim} / action_dim {self.action_dim} exceed max_state_dim "
                f"{self.max_state_dim} / max_action_dim {self.max_action_dim}"
            )
        return self

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.vision.patch_size) ** 2

    # ---- LeRobot config.json, both ways -------------------------------------------------------
    @classmethod
    def from_lerobot(
        cls, cfg: dict[str, Any], arch: dict[str, Any] | None = None, source: str = "config.json"
    ):
        """Build from a LeRobot `config.json` dict (`type` pi0 or pi05); `arch` overrides sizes."""
        kind = cfg.get("type")
        if kind not in ("pi0", "pi05"):
            raise ValueError(
                f"{source}: key 'type' is {kind!r}; the pi0 family reads 'pi0' or 'pi05'"
            )
        res = cfg.get("image_resolution", [224, 224])
        if len(res) != 2 or res[0] != res[1]:
            raise ValueError(
                f"{source}: key 'image_resolution' is {res}; PaliGemma expects a square size"
            )
        feats = cfg.get("input_features") or {}
        cams = [k for k, v in feats.items() if v.get("type") == "VISUAL"]
        state = [v["shape"][0] for v in feats.values() if v.get("type") == "STATE"]
        out = cfg.get("output_features") or {}
        act = [v["shape"][0] for v in out.values() if v.get("type") == "ACTION"]
        kw: dict[str, Any] = {
            "variant": kind,
            "image_size": int(res[0]),
            "num_cameras": max(1, len(cams) + int(cfg.get("empty_cameras", 0))),
            "lerobot_config": cfg,
            "tokenizer_max_length": cfg.get("tokenizer_max_length", 48 if kind == "pi0" else 200),
        }
        for key in (
            "paligemma_variant", "action_expert_variant", "chunk_size", "n_action_steps",
            "max_state_dim", "max_action_dim", "num_inference_steps", "time_sampling_beta_alpha",
            "time_sampling_beta_beta", "time_sampling_scale", "time_sampling_offset", "min_period",
            "max_period", "dtype",
        ):  # fmt: skip
            if key in cfg:
                kw[key] = cfg[key]
        kw["state_dim"] = state[0] if state else kw.get("max_state_dim", 32)
        kw["action_dim"] = act[0] if act else kw.get("max_action_dim", 32)
        for role, name in (("vlm", kw.get("paligemma_variant", "gemma_2b")),
                           ("expert", kw.get("action_expert_variant", "gemma_300m"))):  # fmt: skip
            if arch is None and name not in GEMMA_VARIANTS:
                raise ValueError(
                    f"{source}: unknown Gemma variant {name!r}; known: {sorted(GEMMA_VARIANTS)}"
                )
            kw[role] = GEMMA_VARIANTS.get(name, GEMMA_VARIANTS["gemma_300m"])
        if arch is not None:
            kw.update(_arch_overrides(arch))
        return cls(**kw)

    def to_lerobot(self) -> dict[str, Any]:
        """The LeRobot `config.json` dict for this config (the loaded one updated, or LeRobot's defaults)."""
        cfg = dict(self.lerobot_config) if self.lerobot_config else _lerobot_defaults(self)
        cfg.update(
            type=self.variant,
            paligemma_variant=self.paligemma_variant,
            action_expert_variant=self.action_expert_variant,
            chunk_size=self.chunk_size,
            n_action_steps=self.n_action_steps,
            max_state_dim=self.max_state_dim,
            max_action_dim=self.max_action_dim,
            num_inference_steps=self.num_inference_steps,
            time_sampling_beta_alpha=self.time_sampling_beta_alpha,
            time_sampling_beta_beta=self.time_sampling_beta_beta,
            time_sampling_scale=self.time_sampling_scale,
            time_sampling_offset=self.time_sampling_offset,
            min_period=self.min_period,
            max_period=self.max_period,
            image_resolution=[self.image_size, self.image_size],
            tokenizer_max_length=self.tokenizer_max_length,
            dtype=self.dtype,
        )
        return cfg

    def arch_dict(self) -> dict[str, Any]:
        """Sizes in the `reference_arch.json` format (written as `pi0_arch.json` next to a checkpoint)."""
        return {
            "vlm_gemma": self.vlm.model_dump(),
            "expert_gemma": self.expert.model_dump(),
            "siglip_vision": self.vision.model_dump(),
            "vocab_size": self.vocab_size,
            "image_size": self.image_size,
        }

    def is_released_size(self) -> bool:
        return (
            self.vlm == GEMMA_VARIANTS.get(self.paligemma_variant)
            and self.expert == GEMMA_VARIANTS.get(self.action_expert_variant)
            and self.vision == VisionSpec()
            and self.vocab_size == PALIGEMMA_VOCAB
        )


def _arch_overrides(arch: dict[str, Any]) -> dict[str, Any]:
    """`reference_arch.json` (keys vlm_gemma / expert_gemma / siglip_vision, or vlm / expert / vision)."""
    out: dict[str, Any] = {}
    for role, keys in (("vlm", ("vlm_gemma", "vlm")), ("expert", ("expert_gemma", "expert")),
                       ("vision", ("siglip_vision", "vision"))):  # fmt: skip
        for k in keys:
            if k in arch:
                out[role] = (VisionSpec if role == "vision" else GemmaSpec)(**arch[k])
                break
    if "vocab_size" in arch:
        out["vocab_size"] = int(arch["vocab_size"])
    if "image_size" in arch:
        out["image_size"] = int(arch["image_size"])
    return out


def read_arch(folder: Path) -> dict[str, Any] | None:
    """The size overrides next to a checkpoint (`pi0_arch.json` or `reference_arch.json`), if any."""
    for name in ARCH_FILES:
        p = Path(folder) / name
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: not valid JSON ({e})") from None
    return None


def released_config(variant: Literal["pi0", "pi05"] = "pi0", **overrides: Any) -> Pi0Config:
    """The released pi0 / pi0.5 configuration (PaliGemma 3B + Gemma 300M expert, 224 px, chunk 50)."""
    kw: dict[str, Any] = {
        "variant": variant,
        "tokenizer_max_length": 48 if variant == "pi0" else 200,
    }
    kw.update(overrides)
    return Pi0Config(**kw)


def _lerobot_defaults(cfg: Pi0Config) -> dict[str, Any]:
    """A LeRobot `config.json` for a config built without one (LeRobot 0.5 field names)."""
    feats: dict[str, Any] = {
        f"observation.images.cam{i}": {
            "type": "VISUAL",
            "shape": [3, cfg.image_size, cfg.image_size],
        }
        for i in range(cfg.num_cameras)
    }
    feats["observation.state"] = {"type": "STATE", "shape": [cfg.state_dim]}
    norm = "MEAN_STD" if cfg.variant == "pi0" else "QUANTILES"
    return {
        "type": cfg.variant,
        "n_obs_steps": 1,
        "input_features": feats,
        "output_features": {"action": {"type": "ACTION", "shape": [cfg.action_dim]}},
        "device": "cpu",
        "use_amp": False,
        "empty_cameras": 0,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": norm, "ACTION": norm},
        "gradient_checkpointing": False,
        "compile_model": False,
        "compile_mode": "max-autotune",
        "freeze_vision_encoder": False,
        "train_expert_only": False,
        "optimizer_lr": 2.5e-05,
        "optimizer_betas": [0.9, 0.95],
        "optimizer_eps": 1e-08,
        "optimizer_weight_decay": 0.01,
        "optimizer_grad_clip_norm": 1.0,
        "scheduler_warmup_steps": 1000,
        "scheduler_decay_steps": 30000,
        "scheduler_decay_lr": 2.5e-06,
    }
