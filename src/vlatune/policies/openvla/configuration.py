"""Configuration of the `openvla` family: OpenVLA (Prismatic) and OpenVLA-OFT.

Follows the released `config.json` of `openvla/openvla-7b` (upstream `OpenVLAConfig` in
`prismatic/extern/hf/configuration_prismatic.py`): the vision towers are named by timm model ids
(`timm_model_ids`), the LLM by a Llama `text_config`, the image size by `image_sizes`. The timm
ids are resolved here to the ViT hyper-parameters timm gives them (`TIMM_VITS`), optionally
overridden by keyword arguments (the reference fixtures' `reference_arch.json` `timm_overrides`,
which is how a tiny model is described without changing the released config format).

OFT's platform constants (`prismatic/vla/constants.py` of `moojink/openvla-oft`: chunk length,
action dim, proprio dim, normalisation type) are `OFTConfig`; they are not in the released
`config.json` (upstream picks them from the command line), so a user (or `reference_arch.json`'s
`oft_constants`) names the platform or the values.

    >>> cfg = OpenVLAConfig.from_folder("openvla-7b")
    >>> oft = OFTConfig.for_platform("libero")
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
STATS_NAME = "dataset_statistics.json"

# timm's definitions of the two released towers (timm 0.9.10, `vision_transformer.py`). Keys
# are the VisionTransformer arguments that change the module structure or computation.
TIMM_VITS: dict[str, dict[str, Any]] = {
    "vit_large_patch14_reg4_dinov2.lvd142m": dict(
        patch_size=14,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        mlp_ratio=4.0,
        init_values=1e-5,  # LayerScale (released key `ls1.scale_factor`, timm's `gamma`)
        reg_tokens=4,
        class_token=True,
        no_embed_class=True,  # pos_embed covers the patches only
        global_pool="token",
    ),
    "vit_so400m_patch14_siglip_224": dict(
        patch_size=14,
        embed_dim=1152,
        depth=27,
        num_heads=16,
        mlp_ratio=3.7362,
        init_values=None,
        reg_tokens=0,
        class_token=False,
        no_embed_class=False,
        global_pool="map",  # attention-pool head (`attn_pool.*`), unused by OpenVLA
    ),
}


@dataclass
class ViTSpec:
    """One vision tower: timm's definition with the overrides applied."""

    timm_id: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    init_values: float | None
    reg_tokens: int
    class_token: bool
    no_embed_class: bool
    global_pool: str

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)  # timm: Mlp(hidden_features=int(dim * ratio))

    @classmethod
    def resolve(cls, timm_id: str, img_size: int, overrides: dict | None = None) -> ViTSpec:
        if timm_id not in TIMM_VITS:
            raise ValueError(
                f"config.json: timm_model_ids entry {timm_id!r} is not a tower this port knows; "
                f"expected one of {sorted(TIMM_VITS)}"
            )
        args = dict(TIMM_VITS[timm_id])
        for k, v in (overrides or {}).items():
            if k not in args:
                raise ValueError(
                    f"timm override {k!r} for {timm_id} is not supported; known: {sorted(args)}"
                )
            args[k] = v
        return cls(timm_id=timm_id, img_size=int(img_size), **args)


@dataclass
class OpenVLAConfig:
    """The released `config.json` (kept verbatim in `raw` so saving writes it back unchanged)."""

    raw: dict[str, Any]
    timm_overrides: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: str | Path, timm_overrides: dict | None = None) -> OpenVLAConfig:
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (an OpenVLA HF folder has one)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(raw, timm_overrides, source=str(path))

    @classmethod
    def from_dict(
        cls, raw: dict, timm_overrides: dict | None = None, source: str = "config"
    ) -> OpenVLAConfig:
        for key in ("timm_model_ids", "image_sizes", "text_config"):
            if key not in raw:
                raise ValueError(f"{source}: key {key!r} missing (OpenVLA's config.json has it)")
        if raw.get("use_fused_vision_backbone", True) and len(raw["timm_model_ids"]) != 2:
            raise ValueError(
                f"{source}: use_fused_vision_backbone needs 2 timm_model_ids, "
                f"got {raw['timm_model_ids']}"
            )
        acts = [a for a in raw.get("timm_override_act_layers") or [] if a is not None]
        if acts:
            raise ValueError(
                f"{source}: timm_override_act_layers {acts} is not supported by this port "
                "(the released OpenVLA checkpoints use timm's default GELU)"
            )
        cfg = cls(raw=copy.deepcopy(raw), timm_overrides=copy.deepcopy(timm_overrides or {}))
        cfg.vit_specs()  # validate early
        return cfg

    # -- derived values --------------------------------------------------------------------
    @property
    def use_fused_vision_backbone(self) -> bool:
        return bool(self.raw.get("use_fused_vision_backbone", True))

    def vit_specs(self) -> list[ViTSpec]:
        ids = self.raw["timm_model_ids"][: 2 if self.use_fused_vision_backbone else 1]
        sizes = self.raw["image_sizes"]
        return [ViTSpec.resolve(i, sizes[k], self.timm_overrides.get(i)) for k, i in enumerate(ids)]

    @property
    def text_config(self) -> dict[str, Any]:
        return dict(self.raw["text_config"])

    @property
    def n_action_bins(self) -> int:
        return int(self.raw.get("n_action_bins", 256))

    @property
    def vocab_size(self) -> int:
        """Llama's vocabulary without the padding rows: action tokens are its last 256 ids."""
        return int(self.text_config.get("vocab_size", 32000)) - int(
            self.raw.get("pad_to_multiple_of", 0)
        )

    @property
    def norm_stats(self) -> dict[str, Any]:
        return self.raw.get("norm_stats") or {}

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)


# OFT's platform constants (moojink/openvla-oft prismatic/vla/constants.py).
OFT_PLATFORMS: dict[str, dict[str, Any]] = {
    "libero": dict(
        NUM_ACTIONS_CHUNK=8,
        ACTION_DIM=7,
        PROPRIO_DIM=8,
        ACTION_PROPRIO_NORMALIZATION_TYPE="bounds_q99",
    ),
    "aloha": dict(
        NUM_ACTIONS_CHUNK=25,
        ACTION_DIM=14,
        PROPRIO_DIM=14,
        ACTION_PROPRIO_NORMALIZATION_TYPE="bounds",
    ),
    "bridge": dict(
        NUM_ACTIONS_CHUNK=5,
        ACTION_DIM=7,
        PROPRIO_DIM=7,
        ACTION_PROPRIO_NORMALIZATION_TYPE="bounds_q99",
    ),
}
ACTION_TOKEN_BEGIN_IDX = 31743  # OFT: ids > this are action tokens (the last 256 of 32000)
IGNORE_INDEX = -100


@dataclass
class OFTConfig:
    """OFT's constants and head choice (not stored in the released config.json)."""

    num_actions_chunk: int = 8
    action_dim: int = 7
    proprio_dim: int = 8
    normalization_type: str = "bounds_q99"  # or "bounds"
    head: str = "l1"  # "l1" (L1RegressionActionHead) or "diffusion" (DiffusionActionHead, DDIM)
    num_diffusion_steps_train: int = 50
    use_film: bool = False  # FiLM in the towers; weights in vision_backbone--<step>_checkpoint.pt
    use_proprio: bool = True
    num_images: int = 1  # OFT LIBERO uses 2 (third-person + wrist): 12-channel pixel_values
    attention: str = "bidirectional"  # or "action_span" (see modeling.oft_action_hidden_states)

    def __post_init__(self) -> None:
        if self.attention not in ("bidirectional", "action_span"):
            raise ValueError(
                f"OFT attention {self.attention!r}: expected 'bidirectional' or 'action_span'"
            )
        if self.normalization_type not in ("bounds", "bounds_q99"):
            raise ValueError(
                f"OFT normalization_type {self.normalization_type!r}: expected 'bounds' or 'bounds_q99'"
            )
        if self.head not in ("l1", "diffusion"):
            raise ValueError(f"OFT head {self.head!r}: expected 'l1' or 'diffusion'")

    @classmethod
    def from_constants(cls, constants: dict[str, Any], **kw: Any) -> OFTConfig:
        """From upstream's constant names (`NUM_ACTIONS_CHUNK`, ...), e.g. `oft_constants`."""
        try:
            return cls(
                num_actions_chunk=int(constants["NUM_ACTIONS_CHUNK"]),
                action_dim=int(constants["ACTION_DIM"]),
                proprio_dim=int(constants["PROPRIO_DIM"]),
                normalization_type=str(constants["ACTION_PROPRIO_NORMALIZATION_TYPE"]).lower(),
                **kw,
            )
        except KeyError as e:
            raise ValueError(f"OFT constants: key {e.args[0]!r} missing from {constants}") from e

    @classmethod
    def for_platform(cls, platform: str, **kw: Any) -> OFTConfig:
        if platform not in OFT_PLATFORMS:
            raise ValueError(
                f"OFT platform {platform!r} unknown; expected one of {sorted(OFT_PLATFORMS)}"
            )
        return cls.from_constants(OFT_PLATFORMS[platform], **kw)
