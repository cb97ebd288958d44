"""A policy = backbone + action head (+ energy model), with its normaliser and conventions.

Built from a run config and the training data's statistics; trained through `forward(batch)`
(the batch contract of `vlatune.data.training`); saved as a folder:

    model.safetensors      weights
    config.json            policy config, input spec (cameras, image size and crop, horizon,
                           state and action dims) and the declared conventions
    normalization.json     the action / state normalisers fitted on the training episodes

`predict(obs)` takes one observation (or a list) in the env convention (`vlatune.keys`: upright
uint8 images, 8-d state, instruction) and returns the chunk (H, action_dim) (or (B, H, A)) in
env units: statistics undone, gripper as -1 (open) / +1 (close). The same object is what
`vlatune eval` runs (`needs_images`, `conventions`, `reset`, `describe`).

    >>> policy = VLAPolicy.from_pretrained("runs/demo/checkpoint-2000/policy")
    >>> chunk = policy.predict({"images": {...}, "state": s, "instruction": "pick up ..."})
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlatune.config.schema import PolicyConfig
from vlatune.data.transforms import Normalizer
from vlatune.fsutil import atomic_dir
from vlatune.policies.composed.energy import EnergyModel, infonce
from vlatune.policies.composed.heads import HEADS
from vlatune.policies.composed.tiny import TinyBackbone
from vlatune.policies.processor import declared_conventions

FORMAT = "vlatune-policy/1"


def input_spec(data_cfg, action_dim: int, state_dim: int | None) -> dict[str, Any]:
    """What the policy's inputs look like, from the data config it was trained with."""
    aug = data_cfg.augment
    return {
        "cameras": list(data_cfg.cameras),
        "image_size": data_cfg.image_size,
        "crop_area": aug.crop_area if aug.enabled else 1.0,
        # training-only augmentation of the processor chain (evaluation ignores these)
        "jitter": [aug.brightness, aug.contrast, aug.saturation] if aug.enabled else [0.0] * 3,
        "camera_dropout": data_cfg.camera_dropout,
        "min_cameras": data_cfg.min_cameras,
        "horizon": data_cfg.action_horizon,
        "action_dim": action_dim,
        "state_dim": state_dim,
        "gripper_dim": data_cfg.gripper_dim,
    }


class VLAPolicy(nn.Module):
    needs_images = True

    def __init__(
        self,
        cfg: PolicyConfig,
        spec: dict[str, Any],
        action_norm: Normalizer,
        state_norm: Normalizer | None = None,
        action_tokenizer=None,
        vlm_source: str | None = None,
    ):
        """`action_tokenizer`: the fitted FAST / bins tokenizer of a `tokens` head.
        `vlm_source`: a folder with the hf-vlm architecture (config, tokenizer, image
        processor) whose weights come from the policy's own file (loading a saved policy)."""
        super().__init__()
        if cfg.head not in HEADS and cfg.head != "tokens":
            raise ValueError(
                f"policy.head '{cfg.head}' is not available; choose one of {sorted(HEADS)} or tokens"
            )
        self.cfg, self.spec = cfg, dict(spec)
        self.action_norm, self.state_norm = action_norm, state_norm
        state_dim = spec["state_dim"] if cfg.use_proprio else None
        H, A = spec["horizon"], spec["action_dim"]
        self.action_tokenizer = None
        if cfg.backbone == "tiny":
            self.backbone = TinyBackbone(cfg.tiny, spec["cameras"], spec["image_size"], state_dim)
        elif cfg.backbone == "rdt":
            from vlatune.policies.composed.rdt_style import RDTBackbone

            if cfg.head not in ("diffusion", "flow"):
                raise ValueError("policy.backbone 'rdt' feeds a diffusion or flow head")
            self.backbone = RDTBackbone(
                cfg, spec["cameras"], state_dim, source=vlm_source, text_dim=spec.get("text_dim")
            )
            self.spec["text_dim"] = self.backbone.text_dim
        else:
            from vlatune.policies.composed.hf_vlm import HFVLMBackbone
            from vlatune.policies.composed.token_head import action_vocab

            if cfg.head == "tokens":
                if action_tokenizer is None:
                    raise ValueError("a tokens head needs its fitted action tokenizer")
                self.action_tokenizer = action_tokenizer
            self.backbone = HFVLMBackbone(
                vlm_source or cfg.model_id,
                spec["cameras"],
                state_dim,
                action_vocab=action_vocab(action_tokenizer) if action_tokenizer else 0,
                flow_vocab=cfg.reasoning.flow_tokens,
                dtype=cfg.dtype,
                weights=vlm_source is None,
                film=cfg.film,
            )
        if cfg.head == "tokens":
            from vlatune.policies.composed.token_head import TokenHead

            safe = np.zeros(A) if cfg.safe_action is None else np.asarray(cfg.safe_action)
            if safe.shape != (A,):
                raise ValueError(f"policy.safe_action has {safe.size} values, actions have {A}")
            safe_norm = action_norm(safe[None])[0]
            if spec.get("gripper_dim") is not None:
                safe_norm[spec["gripper_dim"]] = safe[spec["gripper_dim"]]
            self.head = TokenHead(cfg, self.action_tokenizer, H, A, safe_norm)
        else:
            self.head = HEADS[cfg.head](cfg.heads, self.backbone.dim, H, A)
        self.energy = (
            EnergyModel(cfg.energy.hidden, self.backbone.dim, H, A) if cfg.energy.enabled else None
        )
        from vlatune.policies.processor import composed_processor

        # the chain the training loader ran (without its augmentation): one object for both
        self.processor = composed_processor(
            spec["cameras"],
            spec["image_size"],
            action_norm,
            state_norm,
            crop_area=spec["crop_area"],
            jitter=spec.get("jitter", (0.0, 0.0, 0.0)),  # absent: saved before the processor
            camera_dropout=spec.get("camera_dropout", 0.0),
            min_cameras=spec.get("min_cameras", 1),
            gripper_dim=spec.get("gripper_dim"),
            horizon=spec["horizon"],
        )
        if cfg.backbone == "rdt":  # the cached T5 embeddings looked up per sample
            from vlatune.policies.composed.processor import LanguageLookup, with_language

            lookup = LanguageLookup(self.backbone.lang, warn=cfg.rdt.precompute_language)
            self.processor = with_language(self.processor, lookup)
        if cfg.backbone == "hf-vlm":  # prompt ids and vision tensors made per sample
            from vlatune.policies.composed.processor import VLMInputs, with_vlm_inputs

            q = self.head.queries(1)
            self.processor = with_vlm_inputs(
                self.processor,
                VLMInputs.from_backbone(
                    self.backbone,
                    n_state=1 if state_dim else 0,
                    n_queries=0 if q is None else int(q.shape[1]),
                    action_tokenizer=self.action_tokenizer,
                ),
            )
        self.source: str | None = None
        if cfg.lora is not None:
            self._apply_lora(cfg.lora)
        self.apply_freeze(cfg.freeze)

    # ------------------------------------------------------------------ LoRA
    def _apply_lora(self, lora) -> None:
        """LoRA adapters (peft) on the backbone; heads, projectors and the energy model stay
        fully trained. `all-linear` means every nn.Linear of the backbone except attention's
        output projection (nn.MultiheadAttention reads its weight directly, so an adapter there
        would never run)."""
        from peft import LoraConfig as PeftLora
        from peft import inject_adapter_in_model

        if self.cfg.backbone == "hf-vlm":
            from vlatune.policies.composed.hf_vlm import lora_targets

            targets = lora_targets(self.backbone, lora.target_modules)
        elif self.cfg.backbone == "rdt":
            targets = self.backbone.lora_target_names(lora.target_modules)
        elif lora.target_modules == "all-linear":
            targets = sorted(
                name
                for name, m in self.backbone.named_modules()
                if isinstance(m, nn.Linear) and not name.endswith("out_proj")
            )
        else:
            targets = list(lora.target_modules)
        peft_cfg = PeftLora(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
        )
        try:
            self.backbone = inject_adapter_in_model(peft_cfg, self.backbone)
        except ValueError as e:
            raise ValueError(f"policy.lora.target_modules {targets}: {e}") from None
        train_embeddings = getattr(self.backbone, "trains_new_tokens", False)
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(
                "lora_" in name
                or name.startswith("state_proj.")
                or (self.cfg.backbone == "rdt" and self.backbone.trained_under_lora(name))
                or (train_embeddings and ("embed_tokens" in name or "lm_head" in name))
            )

    def merge_lora(self) -> VLAPolicy:
        """Fold the adapters into the weights: a plain policy whose outputs equal this one's."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if self.cfg.lora is None:
            return self
        for module in self.backbone.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        plain = VLAPolicy(
            self.cfg.model_copy(update={"lora": None}),
            self.spec,
            self.action_norm,
            self.state_norm,
            self.action_tokenizer,
            vlm_source=self._vlm_folder(),
        )
        merged = {}
        for k, v in self.state_dict().items():
            if "lora_" in k:
                continue
            merged[k.replace(".base_layer.", ".")] = v
        plain.load_state_dict(merged, strict=True)
        return plain.eval()

    # ------------------------------------------------------------------ training
    def apply_freeze(self, patterns: Sequence[str]) -> None:
        if not patterns:
            return
        hit = False
        for name, p in self.named_parameters():
            if any(fnmatch.fnmatch(name, pat) for pat in patterns):
                p.requires_grad_(False)
                hit = True
        if not hit:
            raise ValueError(f"policy.freeze {list(patterns)} matches no parameter name")

    def param_groups(self, optim_cfg) -> list[dict]:
        """AdamW groups (`optim_cfg`: `vlatune.config.OptimConfig`): no weight decay on norms,
        biases and embeddings; the energy model apart, with its own lr and warm-up
        (policy.energy)."""
        lr, weight_decay = optim_cfg.lr, optim_cfg.weight_decay
        e = self.cfg.energy
        decay, no_decay, energy = [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("energy."):
                energy.append(p)
            elif p.ndim < 2 or "norm" in name or "embed" in name or name.endswith("_pos"):
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [
            {"name": "main", "params": decay, "lr": lr, "weight_decay": weight_decay},
            {"name": "main_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]
        if energy:
            groups.append(
                {
                    "name": "energy",
                    "params": energy,
                    "lr": e.lr,
                    "weight_decay": 0.0,
                    "warmup_steps": e.warmup_steps,
                }
            )
        return [g for g in groups if g["params"]]

    def _vlm_folder(self) -> str | None:
        """hf-vlm / rdt: a folder with the architecture (no weights) for rebuilding this policy."""
        if self.cfg.backbone == "tiny":
            return None
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="vlatune-vlm-"))
        self._save_vlm(folder)
        return str(folder)

    def _save_vlm(self, folder: Path) -> None:
        bb = self.backbone
        if self.cfg.backbone == "rdt":
            bb.vision.config.save_pretrained(folder)
            bb.image_processor.save_pretrained(folder)
            return
        bb.model.config.save_pretrained(folder)
        bb.tokenizer.save_pretrained(folder)
        bb.image_processor.save_pretrained(folder)

    def enable_gradient_checkpointing(self) -> str:
        """Recompute activations in the backward pass (train.gradient_checkpointing). Applies to
        the pretrained transformer of hf-vlm (and the trainable vision tower of rdt under LoRA);
        the tiny backbone is small enough not to need it. Returns what was switched on."""

        def enable(model) -> None:  # transformers 5 renamed it; 4.x has the old name only
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable()
            else:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )

        if self.cfg.backbone == "hf-vlm":
            enable(self.backbone.model)
            return "on the VLM"
        if self.cfg.backbone == "rdt" and self.cfg.lora is not None:
            enable(self.backbone.vision)
            return "on the vision tower"
        return "not needed for this backbone (nothing to do)"

    def _state_input(self, batch: dict[str, Any]):
        return batch.get("state") if self.cfg.use_proprio else None

    def with_vlm(self, batch: dict[str, Any]) -> dict[str, Any]:
        """hf-vlm: the batch with `vlm` (the model's token ids and vision tensors). The loader
        and `predict` run the processor, which adds it in the workers; a batch assembled by
        hand (images (B, 3, S, S) uint8, `image_mask`, `instruction`, and `actions` for a
        tokens head) gets it here, from the same step, sample by sample."""
        if self.cfg.backbone != "hf-vlm" or "vlm" in batch:
            return batch
        from vlatune.policies.composed.processor import vlm_step
        from vlatune.policies.processor import batch_to_device

        step = vlm_step(self.processor)
        images, instructions = batch["images"], batch["instruction"]
        mask = batch.get("image_mask")
        if mask is None:
            mask = torch.ones(len(instructions), len(self.spec["cameras"]), dtype=torch.bool)
        actions = batch.get("actions") if self.cfg.head == "tokens" else None
        vlms = [
            step.build(
                {c: v[b] for c, v in images.items()},
                mask[b],
                instructions[b],
                None if actions is None else actions[b],
            )
            for b in range(len(instructions))
        ]
        device = next(self.parameters()).device
        return {**batch, "vlm": batch_to_device(step.join(vlms), device)}

    def encode(self, batch: dict[str, Any]):
        if self.cfg.backbone == "hf-vlm":
            batch = self.with_vlm(batch)
            B = batch["vlm"]["input_ids"].shape[0]
            state = batch.get("state") if self.cfg.use_proprio else None
            return self.backbone(batch["vlm"], state, self.head.queries(B))
        images = batch["images"]
        B = next(iter(images.values())).shape[0]
        mask = batch.get("image_mask")
        if mask is None:
            mask = torch.ones(B, len(self.spec["cameras"]), dtype=torch.bool)
        extra = {}
        if self.cfg.backbone == "rdt" and "language" in batch:  # made by the processor
            extra["language"] = (batch["language"], batch["language_mask"])
        return self.backbone(
            images,
            mask,
            batch.get("state") if self.cfg.use_proprio else None,
            batch["instruction"],
            self.head.queries(B),
            **extra,
        )

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Losses of one batch: {'loss': total, and each term}."""
        if self.cfg.head == "tokens":
            batch = self.with_vlm(batch)
            loss, metrics = self.head.loss(self.backbone, batch, self._state_input(batch))
            return {"action_loss": loss.detach(), **metrics, "loss": loss}
        out = self.encode(batch)
        actions = batch["actions"].float()
        mask = batch.get("action_mask")
        if mask is None:
            mask = torch.ones(actions.shape[:2], dtype=torch.bool, device=actions.device)
        loss, metrics = self.head.loss(out, actions, mask)
        metrics = {"action_loss": loss.detach(), **metrics}
        if self.energy is not None:
            e_loss, e_metrics = infonce(
                self.energy.pairwise(out.pooled.detach(), actions), self.cfg.energy.tau
            )
            loss = loss + self.cfg.energy.weight * e_loss
            metrics.update(energy_loss=e_loss.detach(), **e_metrics)
        metrics["loss"] = loss
        return metrics

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The policy interface (vlatune.policies.base): `forward`'s total and its terms."""
        out = self.forward(batch)
        return out["loss"], {k: v.detach() for k, v in out.items()}

    def prepare(self, datasets) -> str | None:
        """Before training (vlatune.policies.base): the rdt-style backbone encodes every
        instruction of `datasets` once (policy.rdt.precompute_language) and releases its T5
        encoder, so training runs without it."""
        backbone = self.backbone
        if not (hasattr(backbone, "encode_texts") and self.cfg.rdt.precompute_language):
            return None
        texts = [t for ds in datasets if ds is not None for t in ds.instructions()]
        n = backbone.encode_texts(texts)
        backbone.release_text_encoder()
        return (
            f"language embeddings: {len(set(texts))} instructions ({n} encoded, the rest cached "
            f"in {backbone.cache_dir}); training without the text encoder"
        )

    # ------------------------------------------------------------------ inference
    def _prepare(self, observations: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Observations -> a model-level batch through `self.processor` (evaluation mode), the
        same chain the training loader runs on recorded frames."""
        from vlatune.policies.processor import batch_to_device, frame_from_observation

        proc = self.processor
        frames = [frame_from_observation(o, self.spec["cameras"]) for o in observations]
        if self.state_norm is not None:
            for f in frames:
                if "state" not in f and self.cfg.use_proprio:
                    raise ValueError("observation has no state; the policy was trained with one")
        batch = proc.collate([proc(f) for f in frames])
        if not self.cfg.use_proprio:
            batch.pop("state", None)
        return batch_to_device(batch, next(self.parameters()).device)

    @torch.no_grad()
    def predict_normalized(self, observations: Sequence[dict[str, Any]]) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            return self.predict_chunk(self._prepare(observations))
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict_chunk(self, batch: dict[str, Any]) -> torch.Tensor:
        """The policy interface: (B, H, A) normalised chunks for a model-level batch (images
        resized and scaled, state normalised: what `_prepare` or the training loader gives)."""
        if self.cfg.head == "tokens":
            batch = self.with_vlm(batch)
            return self.head.sample(self.backbone, batch, self._state_input(batch))
        out = self.encode(batch)
        chunk = self.head.sample(out)
        e = self.cfg.energy
        if self.energy is not None and e.correction_alpha > 0:
            chunk = self.energy.correct(
                out.pooled, chunk, e.correction_alpha, e.correction_steps, e.correction_max_step
            )
        return chunk

    def predict(self, obs: dict[str, Any] | Sequence[dict[str, Any]]) -> np.ndarray:
        """Env actions (H, A) for one observation ((B, H, A) for a list): the processor's
        inverse on the normalised chunk (q99: clipped to the training range, counted)."""
        single = isinstance(obs, dict)
        observations = [obs] if single else list(obs)
        actions = self.processor.postprocess(self.predict_normalized(observations))
        return actions[0] if single else actions

    def predict_batch(self, observations: Sequence[dict[str, Any]]) -> np.ndarray:
        """Chunks (B, H, A) for B observations in one forward pass; each depends on its own
        observation only (`vlatune serve` batches concurrent clients' queries through it)."""
        return self.predict(list(observations))

    # the `vlatune eval` policy interface
    @property
    def conventions(self) -> dict[str, Any]:
        return declared_conventions(
            self.spec["cameras"],
            self.spec["state_dim"],
            self.spec["action_dim"],
            self.spec["horizon"],
        )

    def reset(self, ctx) -> None:  # stateless between queries
        return None

    def fallbacks(self) -> dict[str, int]:
        """Cumulative counts of queries that took a fallback: `clipped_actions` (q99
        normalisation: an action, gripper aside, beyond the training range [-1, 1] by more than
        `Normalize.CLIP_TOLERANCE`, clipped; counted by the processor) and, for a tokens head,
        `undecodable_tokens` (the generated tokens did not decode to a chunk; the safe action
        was returned)."""
        out = {"clipped_actions": self.processor.fallbacks().get("clipped_actions", 0)}
        if self.cfg.head == "tokens":
            out["undecodable_tokens"] = int(self.head.decode_failures)
        return out

    def describe(self) -> dict[str, Any]:
        d = {
            "policy": "vlatune",
            "backbone": self.cfg.backbone,
            "head": self.cfg.head,
            "spec": self.spec,
        }
        if self.source:
            d["path"] = self.source
            d["weights_sha256"] = _sha256(Path(self.source) / "model.safetensors")
        return d

    # ------------------------------------------------------------------ save / load
    def _base_prefix(self) -> str:
        """State-dict prefix of the pretrained weights an adapter-only save leaves out."""
        return "backbone.vision." if self.cfg.backbone == "rdt" else "backbone.model."

    def _adapter_only(self) -> bool:
        return self.cfg.backbone != "tiny" and self.cfg.lora is not None

    def save(self, path: str | Path) -> Path:
        """The policy folder. An hf-vlm policy also gets `vlm/` (architecture config, tokenizer
        with the added tokens, image processor); with LoRA only the trained tensors (adapters,
        heads, projector, new-token embeddings) are written, plus the base model id
        (`weights: adapter`), and loading fetches the base weights from `policy.model_id`."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_dir(path) as tmp:
            state = self.state_dict()
            if self._adapter_only():
                trained = {n for n, p in self.named_parameters() if p.requires_grad}
                state = {
                    k: v
                    for k, v in state.items()
                    if k in trained or "lora_" in k or not k.startswith(self._base_prefix())
                }
            state = _unshare(state)
            save_file(state, tmp / "model.safetensors", metadata={"format": FORMAT})
            config = {
                "format": FORMAT,
                "policy": self.cfg.model_dump(mode="json"),
                "spec": self.spec,
                "conventions": self.conventions,
                "weights": "adapter" if self._adapter_only() else "full",
            }
            if self.cfg.backbone != "tiny":
                config["base_model"] = self.cfg.model_id
                self._save_vlm(tmp / "vlm")
            if self.cfg.backbone == "rdt":
                self.backbone.save_language(tmp / "language_embeddings.safetensors")
            if self.action_tokenizer is not None and hasattr(self.action_tokenizer, "save"):
                self.action_tokenizer.save(tmp / "action_tokenizer")
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            norm = {"action": self.action_norm.to_json()}
            if self.state_norm is not None:
                norm["state"] = self.state_norm.to_json()
            (tmp / "normalization.json").write_text(json.dumps(norm, indent=2) + "\n")
            self.processor.save(tmp)  # what `policy inspect` shows; loading rebuilds it
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> VLAPolicy:
        from safetensors.torch import load_file

        path = Path(path)
        if (path / "policy" / "config.json").is_file():  # a training checkpoint folder
            path = path / "policy"
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path}: not a vlatune policy folder (no config.json)")
        config = json.loads(cfg_file.read_text())
        if config.get("format") != FORMAT:
            raise ValueError(
                f"{cfg_file}: format {config.get('format')!r}, this vlatune reads {FORMAT!r}"
            )
        norm_file = path / "normalization.json"
        if not norm_file.is_file():
            raise FileNotFoundError(
                f"{path}: normalization.json is missing; the policy cannot undo its action "
                "normalisation without the training statistics"
            )
        norm = json.loads(norm_file.read_text())
        pcfg = PolicyConfig.model_validate(config["policy"])
        tokenizer = None
        if pcfg.head == "tokens":
            from vlatune.policies.composed.token_head import fit_or_load_tokenizer

            if pcfg.action_tokenizer == "fast":
                pcfg = pcfg.model_copy(
                    update={"action_tokenizer_path": str(path / "action_tokenizer")}
                )
            tokenizer = fit_or_load_tokenizer(pcfg, None)
        adapter = config.get("weights") == "adapter"
        policy = cls(
            pcfg,
            config["spec"],
            Normalizer.from_json(norm["action"]),
            Normalizer.from_json(norm["state"]) if "state" in norm else None,
            tokenizer,
            vlm_source=str(path / "vlm") if pcfg.backbone != "tiny" and not adapter else None,
        )
        if pcfg.backbone == "rdt":
            policy.backbone.load_language(path / "language_embeddings.safetensors")
        state = load_file(path / "model.safetensors", device=device)
        missing, unexpected = policy.load_state_dict(state, strict=False)
        tied = _tied_keys(policy)
        missing = [k for k in missing if k not in tied]
        if adapter:  # the base model's weights came from policy.model_id
            base = policy._base_prefix()
            missing = [k for k in missing if not k.startswith(base) or "lora_" in k]
        if missing or unexpected:
            raise ValueError(
                f"{path / 'model.safetensors'}: weights do not match the config "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        policy.source = str(path.resolve())
        return policy.to(device).eval()


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings / LM head): keep the
    first name of each shared tensor; loading re-ties them."""
    seen: set[tuple[int, int, tuple]] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen and v.numel() > 0:
            continue
        seen.add(key)
        out[k] = v.detach().cpu().contiguous()
    return out


def _tied_keys(module: nn.Module) -> set[str]:
    """State-dict names that alias an earlier name's tensor (not written by `_unshare`)."""
    state = module.state_dict()
    kept = set(_unshare(state))
    return set(state) - kept


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def build_policy(cfg, stats: dict[str, Any], chunks=None) -> VLAPolicy:
    """A fresh policy for a run config (`vlatune.config.Config`) and training statistics.
    `chunks` (a callable returning normalised training chunks (H, A)) fits a FAST tokenizer
    when the recipe asks for one and gives no fitted folder."""
    from vlatune.data.training import normalizers_from_stats

    d = cfg.data
    a_norm, s_norm = normalizers_from_stats(d, stats)
    action_dim = len(a_norm.low)
    state_dim = len(s_norm.low) if s_norm is not None else None
    if cfg.policy.use_proprio and state_dim is None:
        raise ValueError("policy.use_proprio is true but the dataset has no state")
    tokenizer = None
    if cfg.policy.head == "tokens":
        from vlatune.policies.composed.token_head import fit_or_load_tokenizer

        need = cfg.policy.action_tokenizer == "fast" and not cfg.policy.action_tokenizer_path
        tokenizer = fit_or_load_tokenizer(cfg.policy, chunks() if need and chunks else None)
    return VLAPolicy(cfg.policy, input_spec(d, action_dim, state_dim), a_norm, s_norm, tokenizer)
