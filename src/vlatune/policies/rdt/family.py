"""The `rdt` family behind vlatune's policy interface: train, save, resume and evaluate RDT-1B.

`RDTPolicy` = the released `RDTRunner` (the diffusion transformer + adaptors, released layout)
+ a frozen SigLIP vision tower giving the image tokens (the released RDT folder has none:
`policy.vision_encoder`, rdt-1b used google/siglip-so400m-patch14-384) + the precomputed T5
instruction embeddings (`policy.text_encoder`, encoded once in `prepare`, then released) + the
processor (`vlatune.policies.rdt.processor`).

A saved policy folder:

    config.json, model.safetensors       the released layout (base weights when LoRA is on)
    adapter_model.safetensors            LoRA tensors (only with policy.lora)
    vision_encoder/                      SigLIP config, weights, preprocessor_config.json
    language_embeddings.safetensors      the T5 embeddings of the trained instructions
    processor.json                       the processor chain (statistics, unified mapping)
    rdt_policy.json                      text encoder id, token limit, LoRA settings, dtype

LoRA (`policy.lora`): peft adapters on every block's attention and MLP linears (`attn.qkv`,
`attn.proj`, `cross_attn.q`, `cross_attn.kv`, `cross_attn.proj`, `ffn.fc1`, `ffn.fc2`); the
language / image / state adaptors stay fully trained (they map new inputs into the model),
everything else (embedders, position embeddings, norms, final layer) is frozen.

    >>> policy = build_policy(cfg, stats)          # cfg.policy.type == "rdt"
    >>> policy.prepare([train_ds]); loss, metrics = policy.compute_loss(batch)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlatune.fsutil import atomic_dir, write_json
from vlatune.policies.processor import PROCESSOR_FILE, ProcessedPolicy, Processor
from vlatune.policies.rdt.configuration import CONFIG_NAME
from vlatune.policies.rdt.convert import SAFETENSORS_NAME, load_released, ours_to_released
from vlatune.policies.rdt.language import FILE as LANGUAGE_FILE
from vlatune.policies.rdt.language import LanguageEmbeddings
from vlatune.policies.rdt.modeling import RDTRunner

POLICY_FILE = "rdt_policy.json"
FORMAT = "vlatune-rdt-policy/1"
ADAPTER_FILE = "adapter_model.safetensors"
VISION_DIR = "vision_encoder"
PREPROCESSOR = "preprocessor_config.json"
# every block's attention and MLP linears (module names relative to the RDTRunner)
LORA_TARGETS = r"model\.blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q|kv|proj)|ffn\.(fc1|fc2))"
TRAINED_UNDER_LORA = ("lang_adaptor.", "img_adaptor.", "state_adaptor.")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _image_preprocessing(folder: Path) -> dict[str, Any]:
    """SigLIP's normalisation (`image_mean`, `image_std`) from its preprocessor_config.json
    (SigLIP's defaults, 0.5 / 0.5, when the file is absent)."""
    f = folder / PREPROCESSOR
    d = json.loads(f.read_text()) if f.is_file() else {}
    return {
        "image_mean": [float(x) for x in d.get("image_mean", [0.5, 0.5, 0.5])],
        "image_std": [float(x) for x in d.get("image_std", [0.5, 0.5, 0.5])],
    }


def _local(path_or_id: str, what: str) -> Path:
    p = Path(path_or_id)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_id))
    except Exception as e:  # noqa: BLE001 - offline, unknown id, ...: one sentence
        raise FileNotFoundError(
            f"{what} {path_or_id!r} is not a local folder and could not be downloaded "
            f"({type(e).__name__}); give a local folder"
        ) from None


class RDTPolicy(ProcessedPolicy, nn.Module):
    def __init__(
        self,
        runner: RDTRunner,
        vision: nn.Module,
        preprocessing: dict[str, Any],
        language: LanguageEmbeddings,
        processor: Processor,
        lora: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.runner, self.vision = runner, vision.requires_grad_(False).eval()
        self.preprocessing = preprocessing
        self.register_buffer(
            "image_mean", torch.tensor(preprocessing["image_mean"]).view(1, 3, 1, 1), False
        )
        self.register_buffer(
            "image_std", torch.tensor(preprocessing["image_std"]).view(1, 3, 1, 1), False
        )
        self.language, self.processor = language, processor
        self.lora = lora
        if lora is not None:
            self._inject_lora(lora)
        self.source: str | None = None

    # ------------------------------------------------------------------ LoRA
    def _inject_lora(self, lora: dict[str, Any]) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        targets = lora["target_modules"]
        cfg = LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=LORA_TARGETS if targets == "all-linear" else list(targets),
        )
        inject_adapter_in_model(cfg, self.runner)
        for name, p in self.runner.named_parameters():
            p.requires_grad_("lora_" in name or name.startswith(TRAINED_UNDER_LORA))

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The runner's weights under the released names (LoRA's base layers unwrapped)."""
        out = {}
        for k, v in self.runner.state_dict().items():
            if "lora_" in k:
                continue
            k = k.replace(".base_layer.", ".")
            name = ours_to_released(k)
            if name is None:
                raise KeyError(f"no released name for parameter {k!r} (convert.py's _RULES)")
            out[name] = v.detach().contiguous().cpu()
        return out

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().contiguous().cpu()
            for k, v in self.runner.state_dict().items()
            if "lora_" in k
        }

    # ------------------------------------------------------------------ the policy interface
    def prepare(self, datasets) -> str | None:
        """Before training: every instruction of `datasets` through T5 once (or from the
        cache), then the encoder is released; training runs without it."""
        texts = [t for ds in datasets if ds is not None for t in ds.instructions()]
        n = self.language.encode(texts)
        self.language.release()
        self._check_language_width()
        return (
            f"language embeddings: {len(set(texts))} instructions ({n} encoded, the rest cached "
            f"in {self.language.cache_dir}); training without the text encoder"
        )

    def _check_language_width(self) -> None:
        want = self.runner.cfg.lang_token_dim
        for t, e in self.language.known.items():
            if e.shape[-1] != want:
                raise ValueError(
                    f"policy.text_encoder {self.language.encoder_id!r} gives {e.shape[-1]}-d "
                    f"embeddings ({t!r}); the RDT config.json has lang_token_dim {want}"
                )

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, S, S) uint8 -> (B, N * patches, img_token_dim), the frozen SigLIP."""
        B, N = images.shape[:2]
        dtype = next(self.vision.parameters()).dtype
        x = images.flatten(0, 1).float() / 255.0
        x = ((x - self.image_mean) / self.image_std).to(dtype)
        with torch.no_grad():
            feats = self.vision(pixel_values=x).last_hidden_state
        return feats.reshape(B, N * feats.shape[1], feats.shape[2])

    def _conditions(self, batch: dict[str, Any]):
        dtype = next(self.runner.parameters()).dtype
        device = batch["state"].device
        lang, lang_mask = self.language.batch(
            list(batch["instruction"]), self.runner.cfg.max_lang_cond_len, device, dtype
        )
        img = self.image_tokens(batch["images"]).to(dtype)
        if img.shape[1] != self.runner.cfg.img_cond_len:
            raise ValueError(
                f"{img.shape[1]} image tokens, the RDT config.json has img_cond_len "
                f"{self.runner.cfg.img_cond_len} (frames x camera slots x SigLIP patches)"
            )
        mask = batch["unified_mask"].to(dtype)
        freq = batch["ctrl_freq"].to(dtype)
        return lang, lang_mask, img, batch["state"].to(dtype), mask, freq

    def compute_loss(self, batch: dict[str, Any]):
        lang, lang_mask, img, state, mask, freq = self._conditions(batch)
        actions = batch["actions"].to(state.dtype)
        out = self.runner.compute_loss(lang, lang_mask, img, state, actions, mask, freq)
        return out.loss, {"loss": out.loss.detach()}

    @torch.no_grad()
    def predict_chunk(
        self,
        batch: dict[str, Any],
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, H, 128): the sampled chunk in the unified space (normalised actions)."""
        lang, lang_mask, img, state, mask, freq = self._conditions(batch)
        return self.runner.predict_action(
            lang, lang_mask, img, state, mask, freq, noise=noise, generator=generator
        )

    def param_groups(self, optim_cfg) -> list[dict]:
        params = [p for p in self.runner.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: everything is frozen")
        return [{"params": params, "weight_decay": optim_cfg.weight_decay}]

    # ------------------------------------------------------------------ saving
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            (tmp / CONFIG_NAME).write_text(self.runner.cfg.to_json_string())
            save_file(self.base_state_dict(), str(tmp / SAFETENSORS_NAME), {"format": "pt"})
            if self.lora is not None:
                save_file(self.adapter_state_dict(), str(tmp / ADAPTER_FILE), {"format": "pt"})
            self.vision.save_pretrained(tmp / VISION_DIR, safe_serialization=True)
            write_json(tmp / VISION_DIR / PREPROCESSOR, self.preprocessing)
            self.language.save(tmp / LANGUAGE_FILE)
            self.processor.save(tmp)
            dtype = next(self.runner.parameters()).dtype
            write_json(
                tmp / POLICY_FILE,
                {
                    "format": FORMAT,
                    "text_encoder": self.language.encoder_id,
                    "max_text_tokens": self.language.max_tokens,
                    "language_cache": str(self.language.cache_dir),
                    "lora": self.lora,
                    "dtype": "bfloat16" if dtype == torch.bfloat16 else "float32",
                },
            )
        return folder


# ---------------------------------------------------------------------------- build / load
def _vision(folder: Path, dtype: torch.dtype, weights: bool = True) -> nn.Module:
    from transformers import AutoConfig, SiglipVisionConfig, SiglipVisionModel

    conf = AutoConfig.from_pretrained(folder)
    vconf = getattr(conf, "vision_config", conf)
    if not isinstance(vconf, SiglipVisionConfig):
        raise ValueError(
            f"{folder}: a '{conf.model_type}' model; policy.vision_encoder needs a SigLIP "
            "(vision) checkpoint"
        )
    if not weights:
        return SiglipVisionModel(vconf).to(dtype)
    return SiglipVisionModel.from_pretrained(folder, config=vconf, torch_dtype=dtype)


def _check_sizes(runner: RDTRunner, vision: nn.Module, mapping, horizon: int, where: str):
    from vlatune.policies.rdt.processor import N_SLOTS

    c, v = runner.cfg, vision.config
    patches = (v.image_size // v.patch_size) ** 2
    tokens = mapping.img_history_size * N_SLOTS * patches
    if tokens != c.img_cond_len:
        raise ValueError(
            f"{where}: img_cond_len {c.img_cond_len} but the SigLIP tower gives "
            f"{mapping.img_history_size} frames x {N_SLOTS} slots x {patches} patches = {tokens}"
        )
    if v.hidden_size != c.img_token_dim:
        raise ValueError(
            f"{where}: img_token_dim {c.img_token_dim}, the SigLIP tower's width is {v.hidden_size}"
        )
    if horizon != c.pred_horizon:
        raise ValueError(
            f"data.action_horizon is {horizon}, the RDT config.json ({where}) has pred_horizon "
            f"{c.pred_horizon}: set data.action_horizon={c.pred_horizon}"
        )


def build_policy(cfg, stats: dict[str, Any], chunks=None) -> RDTPolicy:
    """From `cfg.policy.pretrained` (required), the SigLIP tower, the T5 encoder id and the
    dataset statistics."""
    from vlatune.data.training import normalizers_from_stats
    from vlatune.policies.rdt.processor import build_processor
    from vlatune.policies.rdt.unified import LiberoUnified

    p, d = cfg.policy, cfg.data
    for key in ("pretrained", "vision_encoder", "text_encoder"):
        if not getattr(p, key):
            raise ValueError(
                f"policy.{key} is not set: the rdt family starts from the released RDT-1B "
                "(policy.pretrained), its SigLIP tower (policy.vision_encoder) and T5 encoder "
                "(policy.text_encoder); see docs/rdt.md"
            )
    dtype = DTYPES[p.dtype]
    folder = _local(p.pretrained, "policy.pretrained")
    runner = load_released(folder, dtype=dtype)
    vfolder = _local(p.vision_encoder, "policy.vision_encoder")
    vision = _vision(vfolder, dtype)
    mapping = LiberoUnified.model_validate(p.unified)
    _check_sizes(runner, vision, mapping, d.action_horizon, str(folder / CONFIG_NAME))
    missing = [c for c in mapping.camera_slots if c is not None and c not in d.cameras]
    if missing:
        raise ValueError(
            f"policy.unified.camera_slots names {missing}, not in data.cameras {d.cameras}"
        )
    pre = _image_preprocessing(vfolder)
    background = [int(m * 255) for m in pre["image_mean"]]  # upstream's background colour
    a_norm, _ = normalizers_from_stats(d, stats)
    aug = d.augment
    processor = build_processor(
        mapping,
        vision.config.image_size,
        background,
        a_norm,
        d.action_horizon,
        crop_area=aug.crop_area if aug.enabled else 1.0,
        jitter=(aug.brightness, aug.contrast, aug.saturation) if aug.enabled else (0.0, 0.0, 0.0),
        camera_dropout=d.camera_dropout,
        min_cameras=d.min_cameras,
        gripper_dim=d.gripper_dim,
    )
    language = LanguageEmbeddings(p.text_encoder, p.max_text_tokens, p.language_cache)
    lora = p.lora.model_dump() if p.lora is not None else None
    policy = RDTPolicy(runner, vision, pre, language, processor, lora)
    policy.source = str(folder)
    return policy


def load_policy(path: str | Path) -> RDTPolicy:
    """A folder `RDTPolicy.save` wrote (evaluation or resume)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_file = path / POLICY_FILE
    if not (path / PROCESSOR_FILE).is_file() or not meta_file.is_file():
        absent = PROCESSOR_FILE if not (path / PROCESSOR_FILE).is_file() else POLICY_FILE
        raise FileNotFoundError(
            f"{path}: no {absent}: a released RDT folder carries no dataset statistics, image "
            "encoder or instruction embeddings, so it cannot act on LIBERO as it is; fine-tune "
            f"it first (vlatune train with policy.type=rdt, policy.pretrained={path})"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{meta_file}: key 'format' is {meta.get('format')!r}, expected {FORMAT!r}"
        )
    dtype = DTYPES[meta["dtype"]]
    lora = meta.get("lora")
    runner = load_released(path, dtype=dtype)  # base weights, strictly
    vision = _vision(path / VISION_DIR, dtype)
    pre = _image_preprocessing(path / VISION_DIR)
    language = LanguageEmbeddings(
        meta.get("text_encoder"), meta["max_text_tokens"], meta.get("language_cache")
    )
    if (path / LANGUAGE_FILE).is_file():
        language.load(path / LANGUAGE_FILE)
    processor = Processor.load(path)
    policy = RDTPolicy(runner, vision, pre, language, processor, lora)
    if lora is not None:
        adapter = load_file(str(path / ADAPTER_FILE))
        own = {k for k in policy.runner.state_dict() if "lora_" in k}
        if set(adapter) != own:
            bad = sorted(set(adapter) ^ own)
            raise ValueError(
                f"{path / ADAPTER_FILE}: LoRA tensors differ from policy.lora: {bad[:5]}"
            )
        policy.runner.load_state_dict(adapter, strict=False)
    policy.source = str(path)
    return policy


__all__ = ["RDTPolicy", "build_policy", "load_policy"]
