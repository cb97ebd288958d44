"""The RDT family's configuration: the init arguments of the released `RDTRunner`.

Follows thu-ml/RoboticsDiffusionTransformer: `RDTRunner(action_dim, pred_horizon, config,
lang_token_dim, img_token_dim, state_token_dim, max_lang_cond_len, img_cond_len,
lang_pos_embed_config, img_pos_embed_config)`, saved by huggingface_hub's `PyTorchModelHubMixin`
as `config.json`, where the entries of the `config` dict (`rdt`, `noise_scheduler`, the adaptor
names, `ema`, ...) sit beside the other arguments at the top level. `RDTConfig` is that flat dict,
typed: unknown keys and wrong types fail naming the file and the key.

The defaults are the released `robotics-diffusion-transformer/rdt-1b`, derived from upstream
`configs/base.yaml` and `train/train.py` (hidden 2048, depth 28, 32 heads; T5-XXL 4096-d
language tokens up to 1024; SigLIP so400m/14 at 384 px: 27 x 27 = 729 patches, 2 frames x 3
cameras = 4374 image tokens; 64-step chunks in the 128-d unified space; DDPM 1000 steps,
squaredcos_cap_v2, `sample` prediction; DPM-Solver++ 5 steps). The released file carries no
`dtype` (the mixin drops it): the loader takes it as an argument.

    >>> cfg = RDTConfig.from_json("rdt-1b/config.json"); cfg.rdt.depth
    28
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

CONFIG_NAME = "config.json"
REQUIRED_KEYS = (
    "action_dim", "pred_horizon", "lang_token_dim", "img_token_dim", "state_token_dim",
    "max_lang_cond_len", "img_cond_len", "rdt", "lang_adaptor", "img_adaptor", "state_adaptor",
    "noise_scheduler",
)  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RDTBlocksConfig(_Strict):
    """`config["rdt"]`: the diffusion transformer's size."""

    hidden_size: int = 2048
    depth: int = 28
    num_heads: int = 32
    cond_pos_embed_type: Literal["multimodal"] = "multimodal"


class NoiseSchedulerConfig(_Strict):
    """`config["noise_scheduler"]`: DDPM for training, DPM-Solver++ (same betas) for sampling."""

    type: Literal["ddpm"] = "ddpm"
    num_train_timesteps: int = 1000
    num_inference_timesteps: int = 5
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: Literal["sample", "epsilon"] = "sample"
    clip_sample: bool = False


class EMAConfig(_Strict):
    """`config["ema"]`: carried for the released layout (upstream trains without EMA)."""

    update_after_step: int = 0
    inv_gamma: float = 1.0
    power: float = 0.75
    min_value: float = 0.0
    max_value: float = 0.9999


# ("lang", -1024): 1024 tokens without a position embedding (a negative length means "no
# embedding along this axis"); ("image", [2, 3, -729]): 2 frames x 3 cameras, a sin-cos embedding
# over frames and cameras, none over the 729 patches (SigLIP already has one).
PosEmbedConfig = list[tuple[str, int | list[int]]]


class RDTConfig(_Strict):
    action_dim: int = 128
    pred_horizon: int = 64
    lang_token_dim: int = 4096
    img_token_dim: int = 1152
    state_token_dim: int = 128
    max_lang_cond_len: int = 1024
    img_cond_len: int = 4374
    lang_pos_embed_config: PosEmbedConfig | None = [("lang", -1024)]
    img_pos_embed_config: PosEmbedConfig | None = [("image", [2, 3, -729])]
    rdt: RDTBlocksConfig = RDTBlocksConfig()
    lang_adaptor: str = "mlp2x_gelu"
    img_adaptor: str = "mlp2x_gelu"
    state_adaptor: str = "mlp3x_gelu"
    noise_scheduler: NoiseSchedulerConfig = NoiseSchedulerConfig()
    ema: EMAConfig = EMAConfig()

    @model_validator(mode="after")
    def _consistent(self) -> RDTConfig:
        r = self.rdt
        if r.hidden_size % r.num_heads:
            raise ValueError(
                f"rdt.hidden_size {r.hidden_size} must be a multiple of rdt.num_heads {r.num_heads}"
            )
        if r.hidden_size % 4:  # sin-cos embeddings split the width in halves of even size
            raise ValueError(f"rdt.hidden_size {r.hidden_size} must be a multiple of 4")
        for name, total, cfg in (
            ("lang_pos_embed_config", self.max_lang_cond_len, self.lang_pos_embed_config),
            ("img_pos_embed_config", self.img_cond_len, self.img_pos_embed_config),
        ):
            if cfg is None:
                continue
            n = sum(_abs_len(v) for _, v in cfg)
            if n != total:
                other = "max_lang_cond_len" if name.startswith("lang") else "img_cond_len"
                raise ValueError(f"{name} covers {n} tokens but {other} is {total}")
        if self.action_dim != self.state_token_dim:
            # The state adaptor embeds the noisy action chunk (value + mask), so both widths
            # must agree (upstream passes state_dim for both).
            raise ValueError(
                f"action_dim {self.action_dim} must equal state_token_dim "
                f"{self.state_token_dim} (one unified vector for state and action)"
            )
        return self

    @property
    def hidden_size(self) -> int:
        return self.rdt.hidden_size

    # ---- the released config.json ----
    def to_released_dict(self) -> dict[str, Any]:
        """The dict the hub mixin writes: init arguments with the `config` entries merged in."""
        return json.loads(self.model_dump_json())

    def to_json_string(self) -> str:
        """As `PyTorchModelHubMixin` writes it: sorted keys, 2-space indent, no final newline."""
        return json.dumps(self.to_released_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(
        cls, d: dict[str, Any], source: str = "config", released: bool = True
    ) -> RDTConfig:
        """From a released config.json's dict (`released`: every upstream-required key present,
        absent position-embedding configs are None as upstream); `released=False` fills any
        absent key with rdt-1b's value."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object of RDTRunner init arguments")
        d = dict(d)
        # `from_pretrained(folder, config=...)` style dicts may nest the model section under
        # "config" (never written by the mixin, which merges it); accept only a dict there.
        nested = d.pop("config", None)
        if nested is not None:
            if not isinstance(nested, dict):
                raise ValueError(f"{source}: key 'config' must be an object")
            d = {**nested, **d}
        d.pop("dtype", None)  # not part of the layout; the loader's argument decides
        if released:
            # Upstream's required init arguments (keyword-only, or read as config[...]): a
            # released file lacking one is an error, never silently given rdt-1b's value.
            absent = [k for k in REQUIRED_KEYS if k not in d]
            if absent:
                raise ValueError(
                    f"{source}: missing key(s) {', '.join(absent)}: an RDT config.json holds "
                    f"RDTRunner's init arguments ({', '.join(REQUIRED_KEYS)})"
                )
            # Upstream's default for an absent position-embedding config is None (a 1-D sin-cos
            # embedding over every token), not rdt-1b's value.
            d.setdefault("lang_pos_embed_config", None)
            d.setdefault("img_pos_embed_config", None)
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            problems = "; ".join(
                f"key '{'.'.join(str(p) for p in err['loc']) or '<root>'}': {err['msg']}"
                for err in e.errors()
            )
            raise ValueError(f"{source}: not a valid RDT config: {problems}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> RDTConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no RDT config.json there") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))


def _abs_len(v: int | list[int]) -> int:
    if isinstance(v, int):
        return abs(v)
    n = 1
    for x in v:
        n *= abs(x)
    return n
