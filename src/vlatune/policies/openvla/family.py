"""The `openvla` family for `vlatune train` / `vlatune eval`: OpenVLA (token fine-tuning) and
OpenVLA-OFT (parallel decoding, L1 or DDIM head, proprio, FiLM, LoRA, energy model).

- `build_policy(cfg, stats)`: starts from `policy.pretrained`, a released folder (the 7B
  release, an OFT LIBERO folder, or a tiny folder whose `reference_arch.json` gives the tower
  sizes); no folder is an error (there is no random full-size start). The VLA comes from the
  folder; OFT's heads from its side files when they are of the asked kind, else freshly built.
  The training statistics replace the folder's in `dataset_statistics.json` (key
  `policy.unnorm_key`), and the processor (`processor.py`) is built from them.
- `OpenVLAPolicy`: the policy interface (`compute_loss`, `predict_chunk`, `param_groups`, `save`)
  + `ProcessedPolicy` (the `vlatune eval` interface). The energy model (`composed.energy`) scores
  (mean of the detached OFT action hidden states, normalised chunk) with in-batch InfoNCE, in its
  own parameter group (lr `energy.lr`, its warm-up, gradient clipping at 1.0).
- LoRA: `LoRALinear` keeps the base `weight` / `bias` names (so the released key map holds) and
  adds `lora_A` / `lora_B`, on every linear of the VLA but `lm_head`.
- `save(folder)`: the released layout (`config.json`, `model.safetensors`, `dataset_statistics.json`,
  `action_head--<step>_checkpoint.pt`, `proprio_projector--<step>_checkpoint.pt`, ...) +
  `lora_adapters.safetensors`, `energy_model--<step>_checkpoint.pt`, `processor.json` (+
  `tokenizer/`) and `vlatune_openvla.json` (what this file needs to rebuild the policy).
  With `merge_lora_on_save` (OFT's `merge_lora_during_training`), `model.safetensors` holds the
  merged VLA and loading subtracts the adapters' product again (equal to float rounding, not bit
  exact); without it, the frozen base (bit-exact resume, but the folder alone lacks the adapters
  for other tools).
- `load_policy(path)`: such a folder, or a released one without `processor.json` (the processor
  from its `dataset_statistics.json` + config; `tokenizer.json` needed to run it).

    >>> policy = load_policy("runs/oft/checkpoint-2/policy")
    >>> actions = policy.predict(obs)          # (8, 7) env actions
"""

from __future__ import annotations

import json
import math
import re
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vlatune.fsutil import atomic_dir, write_json
from vlatune.policies.composed.energy import EnergyModel, infonce
from vlatune.policies.openvla import processor as ovp
from vlatune.policies.openvla.configuration import (
    ACTION_TOKEN_BEGIN_IDX,
    IGNORE_INDEX,
    STATS_NAME,
    OFTConfig,
    OpenVLAConfig,
)
from vlatune.policies.openvla.convert import (
    ACTION_HEAD_GLOB,
    ACTION_HEAD_RULES,
    DIFFUSION_HEAD_RULES,
    FILM_BACKBONE_GLOB,
    NOISY_PROJECTOR_GLOB,
    NOISY_PROJECTOR_RULES,
    PROPRIO_GLOB,
    PROPRIO_RULES,
    OFTHeads,
    _side_file,
    load_released,
    load_strict,
    read_ddp_file,
    save_released,
)
from vlatune.policies.openvla.modeling import OpenVLAForActionPrediction, oft_diffusion_sample
from vlatune.policies.openvla.oft_heads import (
    DiffusionActionHead,
    L1RegressionActionHead,
    NoisyActionProjector,
    ProprioProjector,
)
from vlatune.policies.processor import PROCESSOR_FILE, ProcessedPolicy, Processor

META_NAME = "vlatune_openvla.json"
META_FORMAT = "vlatune-openvla/1"
LORA_NAME = "lora_adapters.safetensors"
ENERGY_GLOB = "energy_model--*_checkpoint.pt"
ARCH_NAME = "reference_arch.json"
DEFAULT_CAMERAS = ("agentview", "wrist")


# ------------------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Module):
    """A linear layer with a low-rank update: y = x W^T + b + (alpha / r) x A^T B^T. The base
    parameters keep the names `weight` / `bias` (the released keys); B starts at zero."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = float(alpha) / r
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def delta(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B) * self.scale


def add_lora(
    vla: nn.Module, r: int, alpha: float, dropout: float, targets: str | list[str] = "all-linear"
) -> list[str]:
    """Wrap every nn.Linear of `vla` but `language_model.lm_head` (peft's "all-linear"), or
    those whose last name part is in `targets`; the rest is frozen."""
    vla.requires_grad_(False)
    names = [
        n
        for n, m in vla.named_modules()
        if isinstance(m, nn.Linear)
        and n != "language_model.lm_head"
        and (targets == "all-linear" or n.rpartition(".")[2] in targets)
    ]
    if not names:
        raise ValueError(
            f"policy.lora.target_modules {targets}: no linear layer of the VLA matches"
        )
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = vla.get_submodule(parent_name) if parent_name else vla
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    return names


def lora_layers(vla: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in vla.named_modules() if isinstance(m, LoRALinear)}


# ----------------------------------------------------------------------------------- policy
def _oft_config(spec: dict[str, Any]) -> OFTConfig:
    return OFTConfig(
        num_actions_chunk=spec["chunk"],
        action_dim=spec["action_dim"],
        proprio_dim=spec.get("proprio_dim", 8),
        normalization_type=spec.get("norm_type", "bounds_q99"),
        head=spec.get("head", "l1"),
        num_diffusion_steps_train=spec.get("diffusion_steps_train", 50),
        use_film=spec.get("film", False),
        use_proprio=spec.get("use_proprio", False),
        num_images=spec.get("num_images", 1),
        attention=spec.get("attention", "bidirectional"),
    )


class OpenVLAPolicy(ProcessedPolicy, nn.Module):
    def __init__(
        self,
        vla: OpenVLAForActionPrediction,
        spec: dict[str, Any],
        processor: Processor,
        action_head: nn.Module | None = None,
        proprio_projector: ProprioProjector | None = None,
        noisy_action_projector: NoisyActionProjector | None = None,
        energy: EnergyModel | None = None,
        step: int = 0,
    ):
        super().__init__()
        self.vla, self.spec, self.processor = vla, dict(spec), processor
        self.action_head = action_head
        self.proprio_projector = proprio_projector
        self.noisy_action_projector = noisy_action_projector
        self.energy = energy
        self.step = int(step)
        self.source: str | None = None
        self.oft = _oft_config(spec)

    @property
    def variant(self) -> str:
        return self.spec["variant"]

    # -- sequences -------------------------------------------------------------------------
    def _sequences(self, batch: dict[str, Any], targets: torch.Tensor | None):
        """Prompt (real ids) + `targets` per sample (action ids or OFT's placeholders) + EOS,
        right-padded; labels on the targets and EOS."""
        ids, am = batch["input_ids"], batch["attention_mask"].bool()
        b = ids.shape[0]
        lengths = am.sum(1).tolist()
        n = targets.shape[1]
        seq = ids.new_full((b, ids.shape[1] + n + 1), ovp.PAD_ID)
        labels = torch.full_like(seq, IGNORE_INDEX)
        att = torch.zeros_like(seq, dtype=torch.bool)
        for i, ln in enumerate(lengths):
            seq[i, :ln] = ids[i, :ln]
            seq[i, ln : ln + n] = targets[i]
            seq[i, ln + n] = ovp.EOS_ID
            labels[i, ln : ln + n + 1] = seq[i, ln : ln + n + 1]
            att[i, : ln + n + 1] = True
        return seq, att, labels

    def _oft_inputs(self, batch):
        b = batch["input_ids"].shape[0]
        n = self.oft.num_actions_chunk * self.oft.action_dim
        placeholder = batch["input_ids"].new_full((b, n), ACTION_TOKEN_BEGIN_IDX + 1)
        seq, att, labels = self._sequences(batch, placeholder)
        pv = batch["pixel_values"].to(self._dtype)
        prop = None
        if self.proprio_projector is not None:
            prop = self.proprio_projector(batch["proprio"].to(self._dtype))
        return seq, att, pv, labels, prop

    @property
    def _dtype(self) -> torch.dtype:
        return self.vla.projector.fc1.weight.dtype

    def _hidden(self, batch, noisy=None, timesteps=None) -> torch.Tensor:
        seq, att, pv, labels, prop = self._oft_inputs(batch)
        kw = {}
        if noisy is not None:
            kw = {
                "noisy_action_features": self.noisy_action_projector(noisy.to(self._dtype)),
                "timestep_embedding": self.action_head.time_embedding(timesteps).to(self._dtype),
            }
        return self.vla.oft_action_hidden_states(seq, att, pv, labels, self.oft, prop, **kw)

    # -- policy interface ------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.variant == "openvla":
            seq, att, labels = self._sequences(batch, batch["action_token_ids"])
            out = self.vla(seq, att, batch["pixel_values"].to(self._dtype), labels)
            mm = torch.cat(
                [
                    labels[:, :1],
                    labels.new_full(
                        (labels.shape[0], out["projected_patches"].shape[1]), IGNORE_INDEX
                    ),
                    labels[:, 1:],
                ],
                dim=1,
            )
            pred, tgt = out["logits"][:, :-1].argmax(-1), mm[:, 1:]
            sel = tgt != IGNORE_INDEX
            acc = (pred[sel] == tgt[sel]).float().mean()
            return out["loss"], {"loss": out["loss"].detach(), "token_accuracy": acc.detach()}
        target = batch["actions"].float()
        mask = batch.get("action_mask")
        w = (
            mask.float()[..., None].expand_as(target)
            if mask is not None
            else torch.ones_like(target)
        )
        metrics: dict[str, Any] = {}
        if self.oft.head == "diffusion":
            sched = self.action_head.noise_scheduler
            noise = torch.randn_like(target)
            t = torch.randint(
                0, sched.config.num_train_timesteps, (target.shape[0],), device=target.device
            )
            noisy = self.action_head.add_noise(target, noise, t)
            h = self._hidden(batch, noisy, t)
            err = (self.action_head.predict_noise(h).float() - noise) ** 2
            loss = (err * w).sum() / w.sum().clamp(min=1)
            metrics["diffusion_loss"] = loss.detach()
        else:
            h = self._hidden(batch)
            err = (self.action_head.predict_action(h).float() - target).abs()
            loss = (err * w).sum() / w.sum().clamp(min=1)
            metrics["l1_loss"] = loss.detach()
        if self.energy is not None:
            ctx = h.detach().float().mean(dim=1)
            e_loss, e = infonce(self.energy.pairwise(ctx, target), self.spec["energy"]["tau"])
            loss = loss + self.spec["energy"]["weight"] * e_loss
            metrics.update(
                E_pos=e["energy_pos"], E_neg=e["energy_neg"], energy_loss=e_loss.detach()
            )
        metrics["loss"] = loss.detach()
        return loss, metrics

    @torch.no_grad()
    def predict_chunk(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, chunk, action_dim) normalised actions in the model's gripper convention."""
        if self.variant == "openvla":
            ids, am = batch["input_ids"], batch["attention_mask"].bool()
            pv = batch["pixel_values"].to(self._dtype)
            out = []
            for i in range(ids.shape[0]):
                tok = self.vla.greedy_action_tokens(
                    ids[i : i + 1, : int(am[i].sum())], pv[i : i + 1], self.oft.action_dim
                )
                out.append(self.vla.tokens_to_normalized(tok)[0])
            return torch.from_numpy(np.stack(out)[:, None]).float()
        if self.oft.head == "diffusion":
            seq, att, pv, labels, prop = self._oft_inputs(batch)
            b = seq.shape[0]
            noise = batch.get("noise")
            if noise is None:
                noise = torch.randn(
                    b, self.oft.num_actions_chunk, self.oft.action_dim, device=seq.device
                )
            chunk = oft_diffusion_sample(
                self.vla, self.action_head, self.noisy_action_projector, seq, att, pv, labels,
                self.oft, noise.to(self._dtype), self.spec["diffusion_steps_inference"], prop,
            )  # fmt: skip
            return chunk.float()
        h = self._hidden(batch)
        chunk = self.action_head.predict_action(h).float()
        e = self.spec.get("energy") or {}
        if self.energy is not None and e.get("correction_alpha", 0) > 0:
            chunk = self.energy.correct(
                h.float().mean(1), chunk, e["correction_alpha"], e["correction_steps"],
                e["correction_max_step"],
            )  # fmt: skip
        return chunk

    def param_groups(self, optim_cfg) -> list[dict]:
        main = [
            p
            for m in (
                self.vla,
                self.action_head,
                self.proprio_projector,
                self.noisy_action_projector,
            )
            if m is not None
            for p in m.parameters()
            if p.requires_grad
        ]
        groups = [
            {
                "params": main,
                "lr": optim_cfg.lr,
                "weight_decay": optim_cfg.weight_decay,
                "name": "vla",
            }
        ]
        if self.energy is not None:
            e = self.spec["energy"]
            groups.append(
                {
                    "params": list(self.energy.parameters()),
                    "lr": e["lr"],
                    "weight_decay": optim_cfg.weight_decay,
                    "warmup_steps": e["warmup_steps"],
                    "name": "energy",
                    "max_grad_norm": 1.0,
                }
            )
        return groups

    # -- saving ----------------------------------------------------------------------------
    def released_state_dict(self, merge: bool) -> dict[str, torch.Tensor]:
        """The VLA's tensors without adapters (merged into the base weights when `merge`)."""
        sd = {k: v for k, v in self.vla.state_dict().items() if ".lora_" not in k}
        if merge:
            for name, layer in lora_layers(self.vla).items():
                w = layer.weight
                sd[f"{name}.weight"] = (w.float() + layer.delta()).to(w.dtype)
        return sd

    def save(self, folder) -> Path:
        folder = Path(folder)
        m = re.search(r"checkpoint-(\d+)", str(folder))
        step = int(m[1]) if m else self.step
        lora = lora_layers(self.vla)
        merge = bool(self.spec.get("merge_lora_on_save", True))
        proxy = types.SimpleNamespace(
            config=self.vla.config, state_dict=lambda: self.released_state_dict(merge)
        )
        heads = None
        if self.variant == "oft":
            heads = OFTHeads(
                self.action_head,
                self.proprio_projector,
                self.oft,
                step,
                self.noisy_action_projector,
            )
        with atomic_dir(folder) as tmp:
            save_released(proxy, tmp / "released", heads=heads, source=self.source)
            for f in (tmp / "released").iterdir():
                f.rename(tmp / f.name)
            (tmp / "released").rmdir()
            if lora:
                adapters = {
                    f"{n}.{k}": getattr(layer, k).detach().contiguous()
                    for n, layer in lora.items()
                    for k in ("lora_A", "lora_B")
                }
                save_file(adapters, str(tmp / LORA_NAME), metadata={"format": "pt"})
            if self.energy is not None:
                torch.save(
                    {k: v.detach().contiguous() for k, v in self.energy.state_dict().items()},
                    tmp / f"energy_model--{step}_checkpoint.pt",
                )
            self.processor.save(tmp)
            write_json(tmp / META_NAME, {"format": META_FORMAT, **self.spec, "step": step})
        return folder


# ----------------------------------------------------------------------------- building
def _arch(folder: Path) -> dict[str, Any]:
    """`reference_arch.json` of a tiny folder (tower sizes as timm overrides), else {}."""
    path = folder / ARCH_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _load_vla(folder: Path, overrides: dict, film: bool, dtype: torch.dtype | None):
    """The released VLA; with `film` and no FiLM backbone file, FiLM layers start at zero
    (identity: the pretrained towers' features unchanged)."""
    has_film_file = any(folder.glob(FILM_BACKBONE_GLOB))
    if film and has_film_file:
        vla, _ = load_released(folder, overrides, OFTConfig(use_film=True), dtype)
        return vla
    vla, _ = load_released(folder, overrides, None, dtype)
    if not film:
        return vla
    filmed = OpenVLAForActionPrediction(vla.config, film=True).to(dtype or torch.float32)
    res = filmed.load_state_dict(vla.state_dict(), strict=False)
    bad = [k for k in res.missing_keys if not re.search(r"\.(scale|shift)\.", k)]
    if bad or res.unexpected_keys:
        raise RuntimeError(f"{folder}: FiLM model keys differ: {bad} {res.unexpected_keys}")
    with torch.no_grad():
        for n, p in filmed.named_parameters():
            if re.search(r"\.blocks\.\d+\.(scale|shift)\.", n):
                p.zero_()
    return filmed


def _head_kind(sd: dict[str, torch.Tensor]) -> str:
    return "diffusion" if any(k.startswith("noise_predictor.") for k in sd) else "l1"


def _build_heads(folder: Path, llm_dim: int, oft: OFTConfig, require: bool):
    """OFT's modules from the folder's side files where they are of the asked kind, else new
    (`require`: a saved policy, where each must be there)."""
    head_path = _side_file(folder, ACTION_HEAD_GLOB)
    sd = read_ddp_file(head_path) if head_path else None
    blocks = 2
    if sd is not None:
        blocks = len({m[1] for k in sd if (m := re.search(r"mlp_resnet_blocks\.(\d+)\.", k))}) or 2
    if oft.head == "diffusion":
        head = DiffusionActionHead(
            llm_dim, llm_dim, oft.action_dim, oft.num_actions_chunk,
            oft.num_diffusion_steps_train, num_blocks=blocks,
        )  # fmt: skip
        rules = DIFFUSION_HEAD_RULES
    else:
        head = L1RegressionActionHead(
            llm_dim, llm_dim, oft.action_dim, oft.num_actions_chunk, num_blocks=blocks
        )
        rules = ACTION_HEAD_RULES
    if sd is not None and _head_kind(sd) == oft.head:
        load_strict(head, sd, rules, str(head_path))
    elif require:
        raise FileNotFoundError(f"{folder}: no {oft.head} {ACTION_HEAD_GLOB} (saved OFT policy)")
    proj = None
    if oft.use_proprio:
        proj = ProprioProjector(llm_dim, oft.proprio_dim)
        path = _side_file(folder, PROPRIO_GLOB)
        if path is not None:
            load_strict(proj, read_ddp_file(path), PROPRIO_RULES, str(path))
        elif require:
            raise FileNotFoundError(f"{folder}: no {PROPRIO_GLOB} but the policy uses proprio")
    noisy = None
    if oft.head == "diffusion":
        noisy = NoisyActionProjector(llm_dim)
        path = _side_file(folder, NOISY_PROJECTOR_GLOB)
        if path is not None and sd is not None and _head_kind(sd) == "diffusion":
            load_strict(noisy, read_ddp_file(path), NOISY_PROJECTOR_RULES, str(path))
        elif require:
            raise FileNotFoundError(f"{folder}: no {NOISY_PROJECTOR_GLOB} (diffusion head)")
    return head, proj, noisy


def _stats_entry(stats: dict[str, Any], gripper_dim: int | None) -> dict[str, Any]:
    """vlatune statistics -> one `dataset_statistics.json` entry (gripper masked)."""
    keys = ("mean", "std", "max", "min", "q01", "q99")
    if "action" not in stats:
        raise ValueError("training statistics: key 'action' missing")
    act = {k: [float(x) for x in stats["action"][k]] for k in keys if k in stats["action"]}
    mask = [True] * len(act["q01"])
    if gripper_dim is not None:
        mask[gripper_dim] = False
    act["mask"] = mask
    entry: dict[str, Any] = {"action": act}
    if stats.get("state"):
        entry["proprio"] = {
            k: [float(x) for x in stats["state"][k]] for k in keys if k in stats["state"]
        }
    return entry


def _tokenizer_from(*folders: Path | None):
    for f in folders:
        if f is not None and (Path(f) / ovp.TOKENIZER_FILE).is_file():
            return ovp.load_tokenizer(f)
    return None


def _processor(spec: dict, vla, tokenizer, cameras, crop_area, jitter, source: str) -> Processor:
    entry = vla.config.norm_stats[spec["unnorm_key"]]
    proprio = entry.get("proprio") if spec.get("use_proprio") else None
    if spec.get("use_proprio") and proprio is None:
        raise ValueError(
            f"{source}: {STATS_NAME}[{spec['unnorm_key']!r}] has no 'proprio' statistics, but "
            "the policy uses proprio"
        )
    return ovp.build_processor(
        cameras=cameras,
        image_size=int(vla.config.raw["image_sizes"][0]),
        tokenizer=tokenizer,
        max_tokens=spec["max_prompt_tokens"],
        action_stats=entry["action"],
        proprio_stats=proprio,
        norm_type=spec["norm_type"],
        variant=spec["variant"],
        horizon=spec["chunk"] if spec["variant"] == "oft" else 1,
        crop_area=crop_area,
        jitter=jitter,
        vocab_size=vla.config.vocab_size,
        gripper_dim=spec.get("gripper_dim", -1),
        source=source,
    )


def _dtype(name: str | None) -> torch.dtype | None:
    return torch.bfloat16 if name == "bfloat16" else None


def build_policy(cfg, stats: dict[str, Any], chunks=None) -> OpenVLAPolicy:
    """A policy for `vlatune train` from `policy.pretrained` and the training statistics."""
    p = cfg.policy
    if not p.pretrained:
        raise ValueError(
            "policy.pretrained: the openvla family starts from a released folder (e.g. "
            "openvla/openvla-7b or an OFT LIBERO folder, downloaded); none was given"
        )
    folder = Path(p.pretrained).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"policy.pretrained {folder}: no config.json (an OpenVLA folder)")
    arch = _arch(folder)
    consts = OFTConfig.for_platform(p.platform)
    if p.variant == "openvla" and p.energy.enabled:
        raise ValueError("policy.energy: the energy model reads OFT's hidden states (variant oft)")
    action_dim = len(stats["action"]["q01"])
    gripper_dim = cfg.data.gripper_dim
    if gripper_dim is not None and gripper_dim < 0:
        gripper_dim += action_dim
    spec: dict[str, Any] = {
        "variant": p.variant,
        "head": p.head,
        "chunk": int(cfg.data.action_horizon) if p.variant == "oft" else 1,
        "action_dim": action_dim,
        "proprio_dim": len(stats["state"]["q01"]) if stats.get("state") else consts.proprio_dim,
        "norm_type": consts.normalization_type,
        "num_images": p.num_images if p.variant == "oft" else 1,
        "use_proprio": bool(p.use_proprio and p.variant == "oft"),
        "film": bool(p.film and p.variant == "oft"),
        "attention": p.attention,
        "diffusion_steps_train": p.diffusion_steps_train,
        "diffusion_steps_inference": p.diffusion_steps_inference,
        "unnorm_key": p.unnorm_key,
        "max_prompt_tokens": p.max_prompt_tokens,
        "gripper_dim": gripper_dim,
        "timm_overrides": arch.get("timm_overrides", {}),
        "lora": p.lora.model_dump() if p.lora else None,
        "merge_lora_on_save": p.merge_lora_on_save,
        "dtype": p.dtype,
        "energy": p.energy.model_dump() if p.energy.enabled else None,
    }
    if spec["use_proprio"] and not stats.get("state"):
        raise ValueError("policy.use_proprio: the training statistics have no 'state'")
    cams = list(cfg.data.cameras)[: spec["num_images"]]
    if len(cams) < spec["num_images"]:
        raise ValueError(
            f"policy.num_images {spec['num_images']} but data.cameras has {list(cfg.data.cameras)}"
        )
    tok_folder = Path(p.tokenizer).expanduser() if p.tokenizer else folder
    tokenizer = ovp.load_tokenizer(tok_folder)
    aug = cfg.data.augment
    crop = aug.crop_area if aug.enabled else 1.0
    jitter = (aug.brightness, aug.contrast, aug.saturation) if aug.enabled else (0.0, 0.0, 0.0)
    return _assemble(folder, spec, tokenizer, cams, crop, jitter, fresh=True, stats=stats)


def _assemble(folder, spec, tokenizer, cameras, crop, jitter, fresh, stats=None, processor=None):
    dtype = _dtype(spec.get("dtype"))
    vla = _load_vla(folder, spec.get("timm_overrides") or {}, spec["film"], dtype)
    if stats is not None:  # the training statistics replace the pretrained folder's
        vla.config.raw["norm_stats"] = {
            spec["unnorm_key"]: _stats_entry(stats, spec["gripper_dim"])
        }
    lora = spec.get("lora")
    if lora:
        add_lora(
            vla, lora["r"], lora["alpha"], lora["dropout"], lora.get("target_modules", "all-linear")
        )
        for n, prm in vla.named_parameters():
            if re.search(r"\.blocks\.\d+\.(scale|shift)\.", n):
                prm.requires_grad_(True)  # OFT trains FiLM fully
        path = folder / LORA_NAME
        if path.is_file() and not fresh:
            _load_adapters(vla, path, subtract=spec.get("merge_lora_on_save", True))
        elif not fresh:
            raise FileNotFoundError(f"{folder}: no {LORA_NAME}, but the policy was saved with LoRA")
    policy_spec = dict(spec)
    head = proj = noisy = None
    llm_dim = vla.language_model.config.hidden_size
    if spec["variant"] == "oft":
        head, proj, noisy = _build_heads(folder, llm_dim, _oft_config(spec), require=not fresh)
    energy = None
    if spec.get("energy"):
        energy = EnergyModel(spec["energy"]["hidden"], llm_dim, spec["chunk"], spec["action_dim"])
        path = _side_file(folder, ENERGY_GLOB)
        if path is not None and not fresh:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            energy.load_state_dict(sd, strict=True)
        elif not fresh:
            raise FileNotFoundError(
                f"{folder}: no {ENERGY_GLOB}, but the policy has an energy model"
            )
    for m in (head, proj, noisy):
        if m is not None and dtype is not None:
            m.to(dtype)
    if processor is None:
        processor = _processor(spec, vla, tokenizer, cameras, crop, jitter, str(folder))
    policy = OpenVLAPolicy(
        vla, policy_spec, processor, head, proj, noisy, energy, spec.get("step", 0)
    )
    policy.source = str(folder)
    return policy


def _load_adapters(vla: nn.Module, path: Path, subtract: bool) -> None:
    """Adapters back into the LoRA layers; `subtract`: model.safetensors held the merged
    weights, so the base is merged - delta (float rounding, not bit exact)."""
    sd = load_file(str(path))
    layers = lora_layers(vla)
    want = {f"{n}.{k}" for n in layers for k in ("lora_A", "lora_B")}
    if set(sd) != want:
        raise KeyError(
            f"{path}: adapter keys differ from the model's: missing {sorted(want - set(sd))[:5]}, "
            f"unexpected {sorted(set(sd) - want)[:5]}"
        )
    with torch.no_grad():
        for n, layer in layers.items():
            layer.lora_A.copy_(sd[f"{n}.lora_A"])
            layer.lora_B.copy_(sd[f"{n}.lora_B"])
            if subtract:
                w = layer.weight
                w.copy_((w.float() - layer.delta()).to(w.dtype))


def load_policy(path) -> OpenVLAPolicy:
    """A folder this family saved, or a released OpenVLA / OFT folder."""
    folder = Path(path).expanduser()
    if (folder / "policy" / "config.json").is_file():
        folder = folder / "policy"
    meta_path = folder / META_NAME
    arch = _arch(folder)
    if meta_path.is_file():
        spec = json.loads(meta_path.read_text())
        if spec.pop("format", None) != META_FORMAT:
            raise ValueError(f"{meta_path}: key 'format' is not {META_FORMAT!r}")
        proc = Processor.load(folder) if (folder / PROCESSOR_FILE).is_file() else None
        if proc is None:
            raise FileNotFoundError(f"{folder}: no processor.json beside {META_NAME}")
        return _assemble(folder, spec, None, None, 1.0, (0,) * 3, fresh=False, processor=proc)
    return _load_released_folder(folder, arch)


def _load_released_folder(folder: Path, arch: dict) -> OpenVLAPolicy:
    """A released folder: variant, head, proprio and FiLM from its side files; chunk and
    dims from OFT's platform constants (`reference_arch.json`'s `oft_constants`, else LIBERO);
    two images when it has a proprio projector (OFT's LIBERO setup), else one."""
    head_path = _side_file(folder, ACTION_HEAD_GLOB)
    consts = arch.get("oft_constants")
    oft = OFTConfig.from_constants(consts) if consts else OFTConfig.for_platform("libero")
    stats_path = folder / STATS_NAME
    cfg = OpenVLAConfig.from_folder(folder, arch.get("timm_overrides"))
    norm = cfg.norm_stats or (json.loads(stats_path.read_text()) if stats_path.is_file() else {})
    if not norm:
        raise FileNotFoundError(
            f"{folder}: no {STATS_NAME} (and no norm_stats in config.json); the processor needs "
            "the action statistics"
        )
    key = arch.get("unnorm_key")
    if key is None:
        if len(norm) != 1:
            raise ValueError(
                f"{stats_path}: {len(norm)} datasets {sorted(norm)}; name the one to use "
                f"(reference_arch.json 'unnorm_key')"
            )
        key = next(iter(norm))
    use_proprio = _side_file(folder, PROPRIO_GLOB) is not None
    variant = "oft" if head_path else "openvla"
    spec = {
        "variant": variant,
        "head": _head_kind(read_ddp_file(head_path)) if head_path else "l1",
        "chunk": oft.num_actions_chunk if head_path else 1,
        "action_dim": len(norm[key]["action"]["q01"]),
        "proprio_dim": oft.proprio_dim,
        "norm_type": oft.normalization_type,
        "num_images": (2 if use_proprio else 1) if head_path else 1,
        "use_proprio": use_proprio,
        "film": any(folder.glob(FILM_BACKBONE_GLOB)),
        "attention": "bidirectional",
        "diffusion_steps_train": 50,
        "diffusion_steps_inference": 50,
        "unnorm_key": key,
        "max_prompt_tokens": 64,
        "gripper_dim": -1,
        "timm_overrides": arch.get("timm_overrides", {}),
        "lora": None,
        "merge_lora_on_save": True,
        "dtype": "float32",
        "energy": None,
    }
    cams = list(DEFAULT_CAMERAS)[: spec["num_images"]]
    policy = _assemble(
        folder,
        spec,
        _tokenizer_from(folder),
        cams,
        0.9 if head_path else 1.0,
        (0,) * 3,
        fresh=False,
    )
    return policy
