"""Configuration of the GR00T N1.5 family, read from NVIDIA's released folder.

Follows NVIDIA's Isaac-GR00T N1.5 (`GR00TN15Config`, as vendored by lerobot 0.5.1 in
`lerobot/policies/groot`): `config.json` (model type `gr00t_n1_5`) carries `backbone_cfg` and
`action_head_cfg` under NVIDIA's names; the Eagle 2.5 VL backbone sizes (SigLIP vision tower,
Qwen3 LLM, pixel shuffle, connector) are not in it: they live in the Eagle processor folder's
`config.json`, which a GR00T folder for vlatune carries as `eagle_config.json` (the fixture
`../shared/reference/groot_n15` does the same). Both dicts are kept verbatim (`raw`, `eagle_raw`)
so a save writes back exactly what was read; typed views (`head`, `dit`, `vl_sa`, `backbone`,
`eagle`) validate the fields the model reads.

    >>> cfg = GrootConfig.from_folder(Path("GR00T-N1.5-3B"))      # config.json + eagle_config.json
    >>> cfg.head.action_horizon, cfg.backbone.select_layer
    (16, 12)
    >>> cfg = GrootConfig.released()                              # N1.5-3B sizes, no files needed
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MODEL_TYPE = "gr00t_n1_5"
EAGLE_FILE = "eagle_config.json"
DEFAULT_EMBODIMENT_ID = 31  # `new_embodiment`, the row fine-tuning on a new robot uses


class _Spec(BaseModel):
    # NVIDIA's configs carry fields the model never reads (paths, tuning flags of other
    # trainers); they are kept in the raw dict, not validated here.
    model_config = ConfigDict(extra="ignore", frozen=True)


class DiTSpec(_Spec):
    """`action_head_cfg.diffusion_model_cfg` (NVIDIA's `DiT`)."""

    num_attention_heads: int = Field(8, gt=0)
    attention_head_dim: int = Field(64, gt=0)
    output_dim: int = Field(26, gt=0)
    num_layers: int = Field(12, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"
    norm_type: str = "ada_norm"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5
    final_dropout: bool = True
    positional_embeddings: str | None = "sinusoidal"
    interleave_self_attention: bool = False
    cross_attention_dim: int | None = None


class SelfAttentionSpec(_Spec):
    """`action_head_cfg.vl_self_attention_cfg` (NVIDIA's `SelfAttentionTransformer`)."""

    num_attention_heads: int = Field(8, gt=0)
    attention_head_dim: int = Field(64, gt=0)
    num_layers: int = Field(12, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"
    final_dropout: bool = True
    positional_embeddings: str | None = "sinusoidal"


class ActionHeadSpec(_Spec):
    """`action_head_cfg` (NVIDIA's `FlowmatchingActionHeadConfig`), with its defaults."""

    action_dim: int = Field(gt=0)
    action_horizon: int = Field(gt=0)
    add_pos_embed: bool = True
    backbone_embedding_dim: int = Field(1536, gt=0)
    input_embedding_dim: int = Field(1536, gt=0)
    hidden_size: int = Field(1024, gt=0)
    max_seq_len: int = Field(1024, gt=0)
    max_state_dim: int = Field(64, gt=0)
    max_num_embodiments: int = Field(32, gt=0)
    noise_beta_alpha: float = Field(1.5, gt=0)
    noise_beta_beta: float = Field(1.0, gt=0)
    noise_s: float = Field(0.999, gt=0, le=1)
    num_timestep_buckets: int = Field(1000, gt=0)
    num_inference_timesteps: int = Field(gt=0)
    num_target_vision_tokens: int = Field(32, gt=0)
    use_vlln: bool = True
    tune_projector: bool = True
    tune_diffusion_model: bool = True
    expand_batch: int | None = None


class BackboneSpec(_Spec):
    """`backbone_cfg` (NVIDIA's `EagleBackbone` arguments)."""

    select_layer: int = Field(12, gt=0)
    project_to_dim: int | None = None
    tune_llm: bool = False
    tune_visual: bool = True
    reproject_vision: bool = False


class EagleSpec(_Spec):
    """The Eagle 2.5 VL config (`Eagle25VLConfig`): vision / text sub-configs kept as dicts for
    transformers' `SiglipVisionConfig` / `Qwen3Config`."""

    vision_config: dict[str, Any]
    text_config: dict[str, Any]
    select_layer: int = -4
    downsample_ratio: float = Field(0.5, gt=0, le=1)
    use_pixel_shuffle: bool = True
    mlp_connector_layers: int = 2
    image_token_index: int = Field(ge=0)
    force_image_size: int | None = None


# Released sizes of nvidia/GR00T-N1.5-3B (its config.json and the Eagle 2.5 processor folder
# `lerobot/eagle2hg-processor-groot-n1p5`): SigLIP so400m/14 at 224 px without pixel shuffle and a
# 1-layer connector ("1mlp_nops"), Qwen3-1.7B cut after 12 layers, a 16-layer DiT.
RELEASED_CONFIG: dict[str, Any] = {
    "action_dim": 32,
    "action_horizon": 16,
    "architectures": ["GR00T_N1_5"],
    "backbone_cfg": {
        "eagle_path": "NVEagle/eagle_er-qwen3_1_7B-Siglip2_400M_stage1_5_128gpu_er_v7_1mlp_nops",
        "load_bf16": False,
        "project_to_dim": None,
        "reproject_vision": False,
        "select_layer": 12,
        "tune_llm": False,
        "tune_visual": True,
        "use_flash_attention": True,
    },
    "action_head_cfg": {
        "action_dim": 32,
        "action_horizon": 16,
        "add_pos_embed": True,
        "backbone_embedding_dim": 2048,
        "diffusion_model_cfg": {
            "attention_head_dim": 48,
            "cross_attention_dim": 2048,
            "dropout": 0.2,
            "final_dropout": True,
            "interleave_self_attention": True,
            "norm_type": "ada_norm",
            "num_attention_heads": 32,
            "num_layers": 16,
            "output_dim": 1024,
            "positional_embeddings": None,
        },
        "hidden_size": 1024,
        "input_embedding_dim": 1536,
        "max_action_dim": 32,
        "max_state_dim": 64,
        "model_dtype": "float32",
        "noise_beta_alpha": 1.5,
        "noise_beta_beta": 1.0,
        "noise_s": 0.999,
        "num_inference_timesteps": 4,
        "num_target_vision_tokens": 32,
        "num_timestep_buckets": 1000,
        "tune_diffusion_model": True,
        "tune_projector": True,
        "use_vlln": True,
        "vl_self_attention_cfg": {
            "attention_head_dim": 64,
            "dropout": 0.2,
            "final_dropout": True,
            "num_attention_heads": 32,
            "num_layers": 4,
            "positional_embeddings": None,
        },
    },
    "compute_dtype": "bfloat16",
    "model_dtype": "float32",
    "model_type": MODEL_TYPE,
}
RELEASED_EAGLE: dict[str, Any] = {
    "model_type": "eagle_2_5_vl",
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    },
    "text_config": {
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151680,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "select_layer": -1,
    "downsample_ratio": 0.5,
    "use_pixel_shuffle": False,
    "mlp_connector_layers": 1,
    "image_token_index": 151669,
    "force_image_size": 224,
}


def _sub(raw: dict, key: str, file: str) -> dict:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise ValueError(
            f"{file}: key `{key}` must be an object (GR00T N1.5 layout), got {value!r}"
        )
    return value


def _parse(cls, data: dict, where: str):
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ValueError(f"{where}: `{loc}`: {first['msg']}") from None


class GrootConfig:
    """A GR00T N1.5 model's configuration: NVIDIA's `config.json` + the Eagle backbone config."""

    def __init__(self, raw: dict[str, Any], eagle_raw: dict[str, Any], source: str = "config"):
        if raw.get("model_type") != MODEL_TYPE:
            raise ValueError(
                f"{source}/config.json: `model_type` is {raw.get('model_type')!r}, "
                f"expected {MODEL_TYPE!r} (NVIDIA's GR00T N1.5 layout)"
            )
        self.raw = copy.deepcopy(raw)
        self.eagle_raw = copy.deepcopy(eagle_raw)
        cfg_file, eagle_file = f"{source}/config.json", f"{source}/{EAGLE_FILE}"
        head = _sub(raw, "action_head_cfg", cfg_file)
        self.head = _parse(ActionHeadSpec, head, f"{cfg_file} action_head_cfg")
        self.dit = _parse(
            DiTSpec, _sub(head, "diffusion_model_cfg", cfg_file), f"{cfg_file} diffusion_model_cfg"
        )
        self.vl_sa = _parse(
            SelfAttentionSpec,
            _sub(head, "vl_self_attention_cfg", cfg_file),
            f"{cfg_file} vl_self_attention_cfg",
        )
        self.backbone = _parse(
            BackboneSpec, _sub(raw, "backbone_cfg", cfg_file), f"{cfg_file} backbone_cfg"
        )
        self.eagle = _parse(EagleSpec, eagle_raw, eagle_file)
        self.compute_dtype = str(raw.get("compute_dtype", "float32"))
        self._check(cfg_file, eagle_file)

    def _check(self, cfg_file: str, eagle_file: str) -> None:
        d, h, e = self.dit, self.head, self.eagle
        if d.norm_type != "ada_norm":
            raise ValueError(f"{cfg_file}: diffusion_model_cfg.norm_type must be 'ada_norm' (N1.5)")
        for name, spec in (("diffusion_model_cfg", d), ("vl_self_attention_cfg", self.vl_sa)):
            if spec.positional_embeddings is not None:
                raise ValueError(
                    f"{cfg_file}: {name}.positional_embeddings is "
                    f"{spec.positional_embeddings!r}; GR00T N1.5 uses null (only that is ported)"
                )
            if spec.activation_fn != "gelu-approximate":
                raise ValueError(f"{cfg_file}: {name}.activation_fn must be 'gelu-approximate'")
        if h.expand_batch is not None:
            raise ValueError(
                f"{cfg_file}: action_head_cfg.expand_batch is not supported (use null)"
            )
        if self.backbone.reproject_vision:
            raise ValueError(f"{cfg_file}: backbone_cfg.reproject_vision must be false (N1.5)")
        if d.num_attention_heads * d.attention_head_dim != h.input_embedding_dim:
            raise ValueError(
                f"{cfg_file}: DiT width num_attention_heads x attention_head_dim = "
                f"{d.num_attention_heads * d.attention_head_dim} must equal "
                f"action_head_cfg.input_embedding_dim = {h.input_embedding_dim}"
            )
        if d.output_dim != h.hidden_size:
            raise ValueError(
                f"{cfg_file}: diffusion_model_cfg.output_dim {d.output_dim} must equal "
                f"action_head_cfg.hidden_size {h.hidden_size} (the action decoder's input)"
            )
        feat = self.backbone.project_to_dim or int(e.text_config.get("hidden_size", 0))
        if h.backbone_embedding_dim != feat:
            raise ValueError(
                f"{cfg_file}: action_head_cfg.backbone_embedding_dim {h.backbone_embedding_dim} "
                f"must equal the backbone feature width {feat} ({eagle_file} text_config."
                "hidden_size, or backbone_cfg.project_to_dim)"
            )
        n_text = int(e.text_config.get("num_hidden_layers", 0))
        if self.backbone.select_layer > n_text:
            raise ValueError(
                f"{cfg_file}: backbone_cfg.select_layer {self.backbone.select_layer} exceeds "
                f"{eagle_file} text_config.num_hidden_layers {n_text}"
            )
        arch = (e.text_config.get("architectures") or ["Qwen3ForCausalLM"])[0]
        if arch != "Qwen3ForCausalLM":
            raise ValueError(f"{eagle_file}: text_config.architectures {arch!r}: N1.5 uses Qwen3")
        if e.vision_config.get("model_type", "siglip_vision_model") != "siglip_vision_model":
            raise ValueError(
                f"{eagle_file}: vision_config.model_type must be 'siglip_vision_model'"
            )
        if e.mlp_connector_layers not in (1, 2):
            raise ValueError(f"{eagle_file}: mlp_connector_layers must be 1 or 2")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path) -> GrootConfig:
        folder = Path(folder)
        cfg_path, eagle_path = folder / "config.json", folder / EAGLE_FILE
        for p in (cfg_path, eagle_path):
            if not p.is_file():
                hint = (
                    " (the Eagle 2.5 VL config.json of the processor folder "
                    "`lerobot/eagle2hg-processor-groot-n1p5`, copied next to the weights)"
                    if p == eagle_path
                    else ""
                )
                raise FileNotFoundError(f"{folder}: no {p.name}{hint}")
        try:
            raw = json.loads(cfg_path.read_text())
            eagle = json.loads(eagle_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{folder}: invalid JSON: {e}") from None
        return cls(raw, eagle, source=str(folder))

    @classmethod
    def released(cls, **overrides: Any) -> GrootConfig:
        """nvidia/GR00T-N1.5-3B's sizes; `overrides` patch the text / vision depth for tests
        (`text_layers`, `vision_layers`, `dit_layers`, `vl_sa_layers`)."""
        raw, eagle = copy.deepcopy(RELEASED_CONFIG), copy.deepcopy(RELEASED_EAGLE)
        if "vision_layers" in overrides:
            eagle["vision_config"]["num_hidden_layers"] = overrides.pop("vision_layers")
        if "text_layers" in overrides:
            n = overrides.pop("text_layers")
            eagle["text_config"]["num_hidden_layers"] = n
            raw["backbone_cfg"]["select_layer"] = min(n, raw["backbone_cfg"]["select_layer"])
        if "dit_layers" in overrides:
            raw["action_head_cfg"]["diffusion_model_cfg"]["num_layers"] = overrides.pop(
                "dit_layers"
            )
        if "vl_sa_layers" in overrides:
            raw["action_head_cfg"]["vl_self_attention_cfg"]["num_layers"] = overrides.pop(
                "vl_sa_layers"
            )
        if overrides:
            raise TypeError(f"unknown overrides: {sorted(overrides)}")
        return cls(raw, eagle, source="released")

    # -- derived sizes -----------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.eagle.force_image_size or self.eagle.vision_config.get("image_size", 224))

    @property
    def tokens_per_image(self) -> int:
        e = self.eagle
        n = (self.image_size // int(e.vision_config.get("patch_size", 14))) ** 2
        return int(n * e.downsample_ratio**2) if e.use_pixel_shuffle else n

    def save(self, folder: str | Path) -> None:
        from vlatune import fsutil

        fsutil.write_json(Path(folder) / "config.json", self.raw)
        fsutil.write_json(Path(folder) / EAGLE_FILE, self.eagle_raw)
