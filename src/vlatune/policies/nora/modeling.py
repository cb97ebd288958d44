"""`NoraPolicy`: NORA's Qwen2.5-VL with its FAST action tokens, behind vlatune's policy interface.

- `compute_loss(batch)`: transformers' causal-LM loss (shifted cross-entropy, mean over the
  labelled tokens) on NORA's labels (processor.py: the action tokens, `<|im_end|>` and the
  newline). The batch is either already encoded (`input_ids`, `attention_mask`, `labels`,
  `pixel_values`, `image_grid_thw`: `processor.encode_sample` + `collate`) or raw
  (`images`: {camera: (B, H, W, 3) uint8 or (B, 3, H, W) float in [0, 1]}, `instruction`,
  `actions`: the normalised (B, H, 7) chunks, which the FAST tokenizer encodes).
- `predict_chunk(batch)`: greedy decoding (no sampling, as NORA) until `<|im_end|>` or
  `max_new_tokens`, NORA's id mapping (every generated id in the action range, minus the base)
  and FAST decode: the normalised (B, H, 7) chunk. A sequence FAST cannot decode safely
  (`DecodeResult.ok` false: wrong count, ids outside the FAST vocabulary, invalid UTF-8) is
  answered with the safe chunk and counted: `fallbacks()["undecodable_tokens"]`.
  The safe chunk is, in env units, zero motion with the gripper open (-1): `safe_action`, in
  the normalised units through NORA's statistics (zeros without statistics).
- `predict_action(batch, unnorm_key)`: the same chunk in env units: NORA's unnormalisation
  (q01 / q99 on every dimension) then NORA's gripper rule ([0, 1] -> -1 open / +1 close).

Loading never resizes the embedding matrix: NORA's vocabulary already holds its action tokens,
and vlatune's own special tokens are not added (convert.py).

    >>> policy = load_released("nora-long", fast_tokenizer="fast")
    >>> env_chunk = policy.predict_action({"images": {"agentview": frames}, "instruction": texts})
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlatune.fsutil import atomic_dir
from vlatune.policies.nora import processor as P
from vlatune.policies.nora.configuration import (
    CONFIG_FILE,
    FAST_FOLDER,
    IM_END,
    NORM_STATS,
    NoraConfig,
)

SAFE_ACTION_ENV = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # zero motion, gripper open


class NoraPolicy(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        image_processor,
        fast,
        cfg: NoraConfig,
        norm_stats: dict[str, Any] | None = None,
        unnorm_key: str | None = None,
        camera: str = "agentview",
    ):
        """`model`: a Qwen2_5_VLForConditionalGeneration; `fast`: a `FastTokenizer` (FAST+ for
        the released checkpoints); `norm_stats`: NORA's norm_stats.json (or the dataset's, same
        layout) used by `predict_action` / `safe_action`."""
        super().__init__()
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.fast, self.cfg = fast, cfg
        self.norm_stats, self.unnorm_key, self.camera = norm_stats, unnorm_key, camera
        self.tokenizer.padding_side = "left"  # NORA's
        self.pad_id = P.pad_id_of(tokenizer)
        self.end_id = int(tokenizer.convert_tokens_to_ids(IM_END))
        self.decode_failures = 0
        self.last_action_ids: list[list[int]] = []
        self.lora: dict[str, Any] | None = None

    # ------------------------------------------------------------------ batches
    def _frames(self, batch: dict[str, Any]) -> list[np.ndarray]:
        images = batch["images"] if "images" in batch else {self.camera: batch["image"]}
        if not isinstance(images, dict):
            images = {self.camera: images}
        x = images[self.camera] if self.camera in images else next(iter(images.values()))
        x = torch.as_tensor(x).detach().cpu()
        if x.dtype != torch.uint8:  # (B, 3, H, W) floats in [0, 1]
            if x.shape[-1] != 3:
                x = x.permute(0, 2, 3, 1)
            x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        elif x.shape[-1] != 3:
            x = x.permute(0, 2, 3, 1)
        return [f.numpy() for f in x]

    def encode(self, batch: dict[str, Any], with_actions: bool) -> dict[str, torch.Tensor]:
        """A raw batch -> NORA's model inputs (left-padded)."""
        frames = self._frames(batch)
        texts = batch["instruction"]
        fast_ids: list[list[int] | None] = [None] * len(frames)
        if with_actions:
            acts = torch.as_tensor(batch["actions"]).detach().cpu().double().numpy()
            fast_ids = [self.fast.encode(a) for a in acts]
        samples = [
            P.encode_sample(
                self.tokenizer, f, t, ids, self.cfg, image_processor=self.image_processor
            )
            for f, t, ids in zip(frames, texts, fast_ids, strict=True)
        ]
        return P.collate(samples, self.pad_id)

    def _model_inputs(self, batch: dict[str, Any], with_labels: bool) -> dict[str, torch.Tensor]:
        if "input_ids" not in batch:
            batch = self.encode(batch, with_actions=with_labels)
        keys = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]
        keys += ["labels"] if with_labels else []
        dev = self.model.device
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        out = {k: batch[k].to(dev) for k in keys}
        out["pixel_values"] = out["pixel_values"].to(dtype)
        return out

    # ------------------------------------------------------------------ interface
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs = self._model_inputs(batch, with_labels=True)
        out = self.model(**inputs)
        labels = inputs["labels"][:, 1:]
        pred = out.logits[:, :-1].argmax(-1)
        act = (labels >= self.cfg.action_base) & (labels <= self.cfg.action_token_max)
        acc = (pred[act] == labels[act]).float().mean() if act.any() else torch.tensor(0.0)
        loss = out.loss
        return loss, {"loss": loss.detach(), "action_token_accuracy": acc.detach()}

    @torch.no_grad()
    def generate_ids(self, batch: dict[str, Any]) -> list[list[int]]:
        """Greedy decoding; the new ids of each sample up to (not including) `<|im_end|>`."""
        inputs = self._model_inputs(batch, with_labels=False)
        out = self.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=self.cfg.max_new_tokens,
            eos_token_id=self.end_id,
            pad_token_id=self.pad_id,
        )
        new = out[:, inputs["input_ids"].shape[1] :].tolist()
        return [row[: row.index(self.end_id)] if self.end_id in row else row for row in new]

    def safe_chunk(self) -> np.ndarray:
        """The safe chunk (H, D) in normalised units (env: zero motion, gripper open)."""
        safe = np.zeros((self.cfg.horizon, self.cfg.action_dim))
        if self.norm_stats is None:
            return safe
        st = P.action_stats(self.norm_stats, self.unnorm_key)
        low, high = np.asarray(st["q01"], float), np.asarray(st["q99"], float)
        x = np.asarray(SAFE_ACTION_ENV, float)[: self.cfg.action_dim].copy()
        x[-1] = P.env_gripper_to_nora(x[-1])
        span = np.where(high > low, high - low, 1.0)
        norm = np.where(high > low, 2 * (x - low) / span - 1, 0.0)  # inverse of P.unnormalize
        return np.broadcast_to(norm, safe.shape).copy()

    @torch.no_grad()
    def predict_chunk(self, batch: dict[str, Any]) -> torch.Tensor:
        chunks, self.last_action_ids = [], []
        H, D = self.cfg.horizon, self.cfg.action_dim
        for row in self.generate_ids(batch):
            ids = P.token_ids_to_action_ids(row, self.cfg)
            self.last_action_ids.append(ids)
            res = self.fast.decode(ids, H, D)
            if res.ok:
                chunks.append(np.asarray(res.actions, dtype=np.float64))
            else:
                self.decode_failures += 1
                chunks.append(self.safe_chunk())
        return torch.as_tensor(np.stack(chunks), dtype=torch.float32)

    def predict_action(self, batch: dict[str, Any], unnorm_key: str | None = None) -> np.ndarray:
        """(B, H, 7) in env units: NORA's unnormalisation, then its gripper rule."""
        if self.norm_stats is None:
            raise ValueError(
                "NoraPolicy.predict_action needs norm_stats (NORA's norm_stats.json or the "
                "dataset's q01 / q99); this policy was built without them"
            )
        st = P.action_stats(self.norm_stats, unnorm_key or self.unnorm_key)
        chunk = self.predict_chunk(batch).double().numpy()
        return P.chunk_to_env(P.unnormalize(chunk, st))

    def fallbacks(self) -> dict[str, int]:
        """`undecodable_tokens`: queries answered with the safe chunk (FAST could not decode
        the generated action tokens)."""
        return {"undecodable_tokens": int(self.decode_failures)}

    def param_groups(self, optim_cfg: Any = None) -> list[dict]:
        """One AdamW group of the trainable parameters (NORA: lr 5e-5, weight decay 1e-8)."""
        lr = float(getattr(optim_cfg, "lr", 5e-5))
        wd = float(getattr(optim_cfg, "weight_decay", 1e-8))
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"name": "nora", "params": params, "lr": lr, "weight_decay": wd}]

    def apply_lora(
        self, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules="all-linear"
    ) -> int:
        """Wrap the model in a peft LoRA (only the adapters train); returns trainable count."""
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules
        )
        self.model = get_peft_model(self.model, lcfg)
        self.lora = {"r": r, "alpha": alpha, "dropout": dropout}
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ folder
    def save(self, folder: str | Path) -> Path:
        """NORA's layout (HF Qwen2.5-VL folder + norm_stats.json) plus `fast_tokenizer/` and
        `nora_config.json`, written under a temporary name and renamed. A LoRA is merged into
        a copy of the model first (the folder loads without peft; the copy costs the model's
        memory once)."""
        folder = Path(folder)
        model = self.model
        if self.lora is not None:
            model = copy.deepcopy(self.model).merge_and_unload()
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            self.image_processor.save_pretrained(tmp)
            if self.norm_stats is not None:
                (tmp / NORM_STATS).write_text(json.dumps(self.norm_stats, indent=2) + "\n")
            (tmp / CONFIG_FILE).write_text(json.dumps(self.cfg.to_json(), indent=2) + "\n")
            self.fast.save(tmp / FAST_FOLDER)
        return folder
