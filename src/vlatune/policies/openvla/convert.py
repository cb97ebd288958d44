"""Load and save the released OpenVLA / OpenVLA-OFT layout.

The layout (`openvla/openvla-7b`, `moojink/openvla-7b-oft-finetuned-libero-*`):
- `config.json` (upstream `OpenVLAConfig`, with its `auto_map`), `generation_config.json`;
- `model.safetensors`, or shards + `model.safetensors.index.json` (the 7B release);
- `dataset_statistics.json` (`{dataset: {"action": {q01, q99, mask, ...}, "proprio": ...}}`);
- OFT side files `action_head--<step>_checkpoint.pt`, `proprio_projector--<step>_checkpoint.pt`:
  `torch.save` of DDP state dicts (`module.` prefix), read here with `torch.load(weights_only=True)`
  only, the prefix stripped.

Keys: our module names are the released ones, so the map is the identity, but it is an explicit
table of rules (torchtune's `_FROM_HF` pattern, one rule per module kind, both directions): a
released key no rule knows is *unexpected*, a model key the file lacks is *missing*, a shape that
differs is reported, and loading fails naming them (`missing == unexpected == []` or an error).

Saving writes the same layout (the folder written under a temporary name and renamed): the
config verbatim, `model.safetensors`, the statistics, and the OFT heads as `.pt` tensor dicts
with the `module.` prefix (the format OFT's `load_component_state_dict` reads; it is a plain
tensor dict, so `torch.load(weights_only=True)` reads it back).

    >>> vla, heads = load_released("openvla-7b-oft-finetuned-libero-spatial", oft=OFTConfig.for_platform("libero"))
    >>> save_released(vla, "out/oft", heads=heads, step=0)
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlatune.fsutil import atomic_dir
from vlatune.policies.openvla.configuration import (
    CONFIG_NAME,
    STATS_NAME,
    OFTConfig,
    OpenVLAConfig,
)
from vlatune.policies.openvla.modeling import OpenVLAForActionPrediction
from vlatune.policies.openvla.oft_heads import (
    DiffusionActionHead,
    L1RegressionActionHead,
    NoisyActionProjector,
    ProprioProjector,
)

SAFETENSORS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
GENERATION_NAME = "generation_config.json"
ACTION_HEAD_GLOB = "action_head--*_checkpoint.pt"
PROPRIO_GLOB = "proprio_projector--*_checkpoint.pt"
NOISY_PROJECTOR_GLOB = "noisy_action_projector--*_checkpoint.pt"
FILM_BACKBONE_GLOB = "vision_backbone--*_checkpoint.pt"
# OFT's FiLM wrapper keeps each timm block as `blocks.<i>.block`; ours has no wrapper level
_FILM_INFIX = re.compile(r"(\.blocks\.\d+)\.block\.")
DDP_PREFIX = "module."


class CheckpointKeyError(KeyError):
    """Released keys and model keys differ; the message names them."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


_N = r"(\d+)"
_WB = r"(weight|bias)"
_VIT = r"vision_backbone\.(featurizer|fused_featurizer)"
# (released key pattern, our key template), one rule per module kind.
VLA_RULES: list[tuple[str, str]] = [
    (rf"{_VIT}\.(cls_token|reg_token|pos_embed)", r"vision_backbone.\1.\2"),
    (rf"{_VIT}\.patch_embed\.proj\.{_WB}", r"vision_backbone.\1.patch_embed.proj.\2"),
    (rf"{_VIT}\.blocks\.{_N}\.(norm1|norm2)\.{_WB}", r"vision_backbone.\1.blocks.\2.\3.\4"),
    (rf"{_VIT}\.blocks\.{_N}\.attn\.(qkv|proj)\.{_WB}", r"vision_backbone.\1.blocks.\2.attn.\3.\4"),
    (rf"{_VIT}\.blocks\.{_N}\.mlp\.(fc1|fc2)\.{_WB}", r"vision_backbone.\1.blocks.\2.mlp.\3.\4"),
    (
        rf"{_VIT}\.blocks\.{_N}\.(ls1|ls2)\.scale_factor",
        r"vision_backbone.\1.blocks.\2.\3.scale_factor",
    ),
    (rf"{_VIT}\.norm\.{_WB}", r"vision_backbone.\1.norm.\2"),
    # FiLM (OFT): only in vision_backbone--<step>_checkpoint.pt, never in model.safetensors
    (rf"{_VIT}\.blocks\.{_N}\.(scale|shift)\.{_WB}", r"vision_backbone.\1.blocks.\2.\3.\4"),
    (
        r"vision_backbone\.fused_featurizer\.attn_pool\.latent",
        r"vision_backbone.fused_featurizer.attn_pool.latent",
    ),
    (
        rf"vision_backbone\.fused_featurizer\.attn_pool\.(q|kv|proj|norm|mlp\.fc1|mlp\.fc2)\.{_WB}",
        r"vision_backbone.fused_featurizer.attn_pool.\1.\2",
    ),
    (rf"projector\.(fc1|fc2|fc3)\.{_WB}", r"projector.\1.\2"),
    (r"language_model\.model\.embed_tokens\.weight", r"language_model.model.embed_tokens.weight"),
    (
        rf"language_model\.model\.layers\.{_N}\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight",
        r"language_model.model.layers.\1.self_attn.\2.weight",
    ),
    (
        rf"language_model\.model\.layers\.{_N}\.mlp\.(gate_proj|up_proj|down_proj)\.weight",
        r"language_model.model.layers.\1.mlp.\2.weight",
    ),
    (
        rf"language_model\.model\.layers\.{_N}\.(input_layernorm|post_attention_layernorm)\.weight",
        r"language_model.model.layers.\1.\2.weight",
    ),
    (r"language_model\.model\.norm\.weight", r"language_model.model.norm.weight"),
    (r"language_model\.lm_head\.weight", r"language_model.lm_head.weight"),
]
ACTION_HEAD_RULES: list[tuple[str, str]] = [
    (rf"model\.(layer_norm1|layer_norm2|fc1|fc2)\.{_WB}", r"model.\1.\2"),
    (
        rf"model\.mlp_resnet_blocks\.{_N}\.ffn\.(0|1)\.{_WB}",
        r"model.mlp_resnet_blocks.\1.ffn.\2.\3",
    ),
]
DIFFUSION_HEAD_RULES: list[tuple[str, str]] = [
    (
        rf"noise_predictor\.mlp_resnet\.(layer_norm1|layer_norm2|fc1|fc2)\.{_WB}",
        r"noise_predictor.mlp_resnet.\1.\2",
    ),
    (
        rf"noise_predictor\.mlp_resnet\.mlp_resnet_blocks\.{_N}\.ffn\.(0|1)\.{_WB}",
        r"noise_predictor.mlp_resnet.mlp_resnet_blocks.\1.ffn.\2.\3",
    ),
]
PROPRIO_RULES: list[tuple[str, str]] = [(rf"(fc1|fc2)\.{_WB}", r"\1.\2")]
NOISY_PROJECTOR_RULES = PROPRIO_RULES  # the same two linears (fc1: 1 -> D, fc2)


def _compile(rules: list[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(p), t) for p, t in rules]


def _reverse(rules: list[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    """Our templates as patterns, the released patterns as templates (identity names)."""
    return _compile(rules)


def map_keys(sd: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> tuple[dict, list[str]]:
    """Rename by the first full-match rule; keys no rule knows are returned as unexpected."""
    out, unknown = {}, []
    comp = _compile(rules)
    for k, v in sd.items():
        for pat, tmpl in comp:
            if pat.fullmatch(k):
                out[pat.sub(tmpl, k)] = v
                break
        else:
            unknown.append(k)
    return out, unknown


def load_strict(
    module: torch.nn.Module,
    sd: dict,
    rules: list[tuple[str, str]],
    source: str,
    assign: bool = False,
) -> None:
    """Map `sd` through `rules` and load it strictly; raise naming every key that differs."""
    mapped, unknown = map_keys(sd, rules)
    own = module.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(unknown + [k for k in mapped if k not in own])
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or bad:
        raise CheckpointKeyError(
            f"{source}: the checkpoint does not match the model: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)}), shape mismatches {bad[:10]}"
        )
    res = module.load_state_dict(mapped, strict=True, assign=assign)
    assert not res.missing_keys and not res.unexpected_keys


def read_vla_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / SAFETENSORS_NAME, folder / INDEX_NAME
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: expected a JSON object with a 'weight_map' ({e})") from e
        sd: dict[str, torch.Tensor] = {}
        for s in shards:
            sd.update(load_file(str(folder / s)))
        return sd
    raise FileNotFoundError(
        f"{folder}: neither {SAFETENSORS_NAME} nor {INDEX_NAME} (OpenVLA HF folder)"
    )


def read_ddp_file(path: Path) -> dict[str, torch.Tensor]:
    """An OFT side file: a tensor dict (weights_only), `module.` prefixes stripped."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(
            f"{path}: expected a dict of tensors (a state_dict), got {type(sd).__name__}"
        )
    return {k.removeprefix(DDP_PREFIX): v for k, v in sd.items()}


def _side_file(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    if len(found) > 1:
        raise ValueError(f"{folder}: several {pattern} files {[p.name for p in found]}; keep one")
    return found[0] if found else None


@dataclass
class OFTHeads:
    action_head: L1RegressionActionHead | DiffusionActionHead | None
    proprio_projector: ProprioProjector | None
    config: OFTConfig
    step: int = 0
    noisy_action_projector: NoisyActionProjector | None = None  # diffusion only


def is_released_folder(path: str | Path) -> bool:
    """Whether `path` is an OpenVLA / OpenVLA-OFT HF folder (config.json of model type
    `openvla`); loading then names whatever else is missing (weights, OFT side files)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("model_type") == "openvla"


def load_released(
    folder: str | Path,
    timm_overrides: dict | None = None,
    oft: OFTConfig | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[OpenVLAForActionPrediction, OFTHeads | None]:
    """The VLA (and, given `oft`, its side-file heads) from a released folder, loaded strictly.

    The model is built on the meta device and the weights assigned, so a 7B folder is read once.
    """
    folder = Path(folder)
    cfg = OpenVLAConfig.from_folder(folder, timm_overrides)
    stats_path = folder / STATS_NAME
    if stats_path.is_file() and not cfg.norm_stats:
        cfg.raw["norm_stats"] = json.loads(stats_path.read_text())
    film = bool(oft is not None and oft.use_film)
    with torch.device("meta"):
        model = OpenVLAForActionPrediction(cfg, film=film)
    sd = read_vla_state_dict(folder)
    if film:
        sd.update(read_film_backbone(folder))
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    load_strict(model, sd, VLA_RULES, str(folder), assign=True)
    _materialise_buffers(model)
    heads = None
    if oft is not None:
        heads = load_oft_heads(folder, model.language_model.config.hidden_size, oft, dtype)
    return model, heads


def read_film_backbone(folder: Path) -> dict[str, torch.Tensor]:
    """OFT's `vision_backbone--<step>_checkpoint.pt` (the whole FiLM-wrapped backbone, which
    supersedes the towers of model.safetensors), in our key names.

    OFT applies LoRA (`all-linear`) before wrapping the towers, so the file holds each tower
    linear as `base_layer` + `lora_A.default` / `lora_B.default`; OFT's deploy code rebuilds that
    LoRA with alpha = min(rank, 16). We merge it here: W = W_base + alpha / rank * B @ A
    (rank from lora_A's rows), computed in float32.
    """
    path = _side_file(folder, FILM_BACKBONE_GLOB)
    if path is None:
        raise FileNotFoundError(f"{folder}: no {FILM_BACKBONE_GLOB}, but OFTConfig.use_film is set")
    sd = read_ddp_file(path)
    return {_FILM_INFIX.sub(r"\1.", k): v for k, v in merge_lora(sd, str(path)).items()}


def merge_lora(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """peft LoRA layers (`X.base_layer.*`, `X.lora_A.<name>.weight`, `X.lora_B.<name>.weight`)
    merged into plain `X.weight` / `X.bias`, alpha = min(rank, 16) (OFT's LoraConfig)."""
    out: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.[^.]+\.weight", k)
        if m:
            lora.setdefault(m[1], {})[m[2]] = v
        elif ".base_layer." in k:
            out[k.replace(".base_layer.", ".")] = v
        elif "lora_" in k:
            raise CheckpointKeyError(f"{source}: LoRA key {k} of a kind this port cannot merge")
        else:
            out[k] = v
    for mod, ab in lora.items():
        w = out.get(f"{mod}.weight")
        if w is None or set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointKeyError(f"{source}: LoRA layer {mod} lacks its base weight or A / B")
        rank = ab["lora_A"].shape[0]
        delta = (ab["lora_B"].float() @ ab["lora_A"].float()) * (min(rank, 16) / rank)
        out[f"{mod}.weight"] = (w.float() + delta).to(w.dtype)
    return out


def _materialise_buffers(model: OpenVLAForActionPrediction) -> None:
    """Recompute the (non-persistent) RoPE buffers that the meta build left empty."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    lm = model.language_model.model
    lm.rotary_emb = LlamaRotaryEmbedding(config=model.language_model.config)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:10]}")


def load_oft_heads(
    folder: Path, llm_dim: int, oft: OFTConfig, dtype: torch.dtype | None = None
) -> OFTHeads:
    head_path = _side_file(folder, ACTION_HEAD_GLOB)
    prop_path = _side_file(folder, PROPRIO_GLOB)
    if head_path is None:
        raise FileNotFoundError(
            f"{folder}: no {ACTION_HEAD_GLOB} (OFT's L1 action head file); an OFT folder has one"
        )
    step = int(re.search(r"--(\d+)_checkpoint", head_path.name)[1])
    head_sd = read_ddp_file(head_path)
    # OFT builds 2 MLP-ResNet blocks; count them from the file so another count loads too
    blocks = len({m[1] for k in head_sd if (m := re.search(r"mlp_resnet_blocks\.(\d+)\.", k))})
    if oft.head == "diffusion":
        head = DiffusionActionHead(
            llm_dim,
            llm_dim,
            oft.action_dim,
            oft.num_actions_chunk,
            oft.num_diffusion_steps_train,
            num_blocks=blocks or 2,
        )
        load_strict(head, head_sd, DIFFUSION_HEAD_RULES, str(head_path))
    else:
        head = L1RegressionActionHead(
            llm_dim, llm_dim, oft.action_dim, oft.num_actions_chunk, num_blocks=blocks or 2
        )
        load_strict(head, head_sd, ACTION_HEAD_RULES, str(head_path))
    noisy = None
    if oft.head == "diffusion":
        noisy_path = _side_file(folder, NOISY_PROJECTOR_GLOB)
        if noisy_path is None:
            raise FileNotFoundError(
                f"{folder}: no {NOISY_PROJECTOR_GLOB}; OFT's diffusion head needs its noisy "
                "action projector"
            )
        noisy = NoisyActionProjector(llm_dim)
        load_strict(noisy, read_ddp_file(noisy_path), NOISY_PROJECTOR_RULES, str(noisy_path))
    proj = None
    if prop_path is not None:
        proj = ProprioProjector(llm_dim, oft.proprio_dim)
        load_strict(proj, read_ddp_file(prop_path), PROPRIO_RULES, str(prop_path))
    elif oft.use_proprio:
        raise FileNotFoundError(f"{folder}: no {PROPRIO_GLOB} but OFT use_proprio is set")
    if dtype is not None:
        for m in (head, proj, noisy):
            if m is not None:
                m.to(dtype)
    return OFTHeads(head, proj, oft, step, noisy)


def released_state_dict(model: OpenVLAForActionPrediction) -> dict[str, torch.Tensor]:
    """Our state dict in the released key names (the reverse rules)."""
    sd, unknown = map_keys(model.state_dict(), VLA_RULES)
    if unknown:
        raise CheckpointKeyError(f"model keys with no released name: {unknown}")
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_released(
    model: OpenVLAForActionPrediction,
    folder: str | Path,
    heads: OFTHeads | None = None,
    source: str | Path | None = None,
) -> Path:
    """Write the released layout atomically; `source` copies its generation_config.json."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        gen = Path(source) / GENERATION_NAME if source else None
        if gen is not None and gen.is_file():
            shutil.copyfile(gen, tmp / GENERATION_NAME)
        released = released_state_dict(model)
        film = {
            k: v for k, v in released.items() if re.search(r"\.blocks\.\d+\.(scale|shift)\.", k)
        }
        if film:  # OFT's layout: the VLA without FiLM + the whole wrapped backbone on the side
            backbone = {
                re.sub(r"(\.blocks\.\d+)\.(?!scale\.|shift\.)", r"\1.block.", k): v
                for k, v in released.items()
                if k.startswith("vision_backbone.")
            }
            released = {k: v for k, v in released.items() if k not in film}
            torch.save(
                backbone, tmp / f"vision_backbone--{heads.step if heads else 0}_checkpoint.pt"
            )
        save_file(released, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        if model.config.norm_stats:
            (tmp / STATS_NAME).write_text(json.dumps(model.config.norm_stats, indent=2) + "\n")
        if heads is not None:
            head_rules = (
                DIFFUSION_HEAD_RULES
                if isinstance(heads.action_head, DiffusionActionHead)
                else ACTION_HEAD_RULES
            )
            for name, module, rules in (
                ("action_head", heads.action_head, head_rules),
                ("proprio_projector", heads.proprio_projector, PROPRIO_RULES),
                ("noisy_action_projector", heads.noisy_action_projector, NOISY_PROJECTOR_RULES),
            ):
                if module is None:
                    continue
                sd, unknown = map_keys(module.state_dict(), rules)
                if unknown:
                    raise CheckpointKeyError(f"{name}: keys with no released name: {unknown}")
                torch.save(
                    {DDP_PREFIX + k: v.contiguous() for k, v in sd.items()},
                    tmp / f"{name}--{heads.step}_checkpoint.pt",
                )
    return folder
