"""`tokens` head: actions as language-model tokens (NORA with FAST, OpenVLA with bins).

Target sequence after the prompt: [reasoning text][flow tokens] <robot_action_k>... <end>.
- Action ids come from the action tokenizer (FAST or bins) on the normalised chunk; id k is the
  text token `<robot_action_k>`. The whole chunk is encoded, padded steps included (a FAST
  token mixes all timesteps, so a per-step mask cannot apply; the data pads by repeating the
  episode's last action, as FAST and NORA do).
- Reasoning (ECoT tags, one `TAG: text` per line) and flow tokens (`<flow_k>`, visual CoT)
  are extra targets: reasoning dropout removes the whole reasoning of a sample with
  probability `dropout` (NORA: 0.5), and each line independently with `tag_dropout`; the
  reasoning tokens' loss is weighted by `loss_weight`. The draws use torch's global RNG, which
  the trainer seeds and checkpoints (exact resume).
- Labels cover only the targets; metrics: `action_loss` (cross-entropy), `token_accuracy`
  (greedy next-token accuracy on action tokens), `cot_loss`.
- Inference: greedy decoding with the KV cache. `inference: skip` restricts decoding to action
  tokens (and the end token), so the reasoning is skipped; `generate` lets the model write its
  reasoning first, then reads the action tokens that follow. A sequence that does not decode
  to an (H, A) chunk is replaced by the safe action and counted in `decode_failures` (one per
  observation), which `VLAPolicy.fallbacks()` reports as `undecodable_tokens`: `vlatune eval`
  records it per episode and per task, and warns above 1% of the queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def reasoning_text(value: Any) -> str:
    """A reasoning annotation as text: a {tag: text} mapping becomes `TAG: text` lines."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return "\n".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


class TokenHead(nn.Module):
    def __init__(self, cfg, action_tokenizer, horizon: int, action_dim: int, safe_action):
        super().__init__()
        self.cfg, self.tok = cfg, action_tokenizer
        self.horizon, self.action_dim = horizon, action_dim
        self.safe_action = np.asarray(safe_action, dtype=np.float32)  # normalised units
        self.decode_failures = 0
        self.last_text: list[str] = []

    def queries(self, batch: int) -> None:
        return None

    # ------------------------------------------------------------------ targets
    def _reasoning(self, backbone, batch: dict[str, Any], B: int) -> list[list[int]]:
        r = self.cfg.reasoning
        out: list[list[int]] = [[] for _ in range(B)]
        if not r.enabled:
            return out
        texts = batch.get("reasoning") or [None] * B
        flows = batch.get("flow_tokens")
        keep = torch.rand(B) >= r.dropout
        for b in range(B):
            if not keep[b]:
                continue
            lines = [ln for ln in reasoning_text(texts[b]).split("\n") if ln.strip()]
            if r.tag_dropout > 0 and lines:
                draws = torch.rand(len(lines))
                lines = [ln for ln, d in zip(lines, draws, strict=True) if d >= r.tag_dropout]
            ids: list[int] = []
            if lines:
                ids = backbone.tokenizer("\n".join(lines) + "\n", add_special_tokens=False)[
                    "input_ids"
                ]
            if flows is not None and flows[b] is not None and backbone.flow_ids:
                ids = ids + [backbone.flow_ids[int(c)] for c in flows[b]]
            out[b] = ids
        return out

    def with_reasoning(self, backbone, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The batch's `vlm` (prompt + action target ids, made by the processor step) with the
        reasoning targets (drawn here: dropout uses the trainer's torch stream) inserted before
        the action ids; unchanged when reasoning is off."""
        vlm = batch["vlm"]
        if not self.cfg.reasoning.enabled:
            return vlm
        from vlatune.policies.composed.processor import repack, unpack

        prompts, targets = unpack(vlm)
        reasoning = self._reasoning(backbone, batch, len(prompts))
        rows = [r + t for r, t in zip(reasoning, targets, strict=True)]
        return repack(vlm, prompts, rows, backbone.pad_id)

    # ------------------------------------------------------------------ loss
    def loss(self, backbone, batch: dict[str, Any], state) -> tuple[torch.Tensor, dict]:
        """`batch["vlm"]`: prompt + action target ids per sample (composed.vlm_inputs)."""
        inputs = self.with_reasoning(backbone, batch)
        if not bool((inputs["labels"] != -100).any()):
            raise ValueError(
                "tokens head: the batch has no target ids (composed.vlm_inputs adds them to "
                "samples with actions)"
            )
        logits = backbone.token_logits(inputs, state)[:, :-1].float()
        labels = inputs["labels"][:, 1:].to(logits.device)
        valid = labels != -100
        is_action = torch.isin(labels, backbone.action_ids) | (labels == backbone.eos_id)
        ce = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp(min=0), reduction="none"
        ).view(labels.shape)
        a_mask, r_mask = valid & is_action, valid & ~is_action
        action_loss = (ce * a_mask).sum() / a_mask.sum().clamp(min=1)
        acc = ((logits.argmax(-1) == labels) & a_mask).sum() / a_mask.sum().clamp(min=1)
        metrics = {"token_accuracy": acc.detach()}
        loss = action_loss
        if self.cfg.reasoning.enabled:
            cot = (ce * r_mask).sum() / r_mask.sum().clamp(min=1)
            loss = loss + self.cfg.reasoning.loss_weight * cot
            metrics["cot_loss"] = cot.detach()
            metrics["cot_fraction"] = (r_mask.any(1).float().mean()).detach()
        return loss, {"action_ce": action_loss.detach(), **metrics}

    # ------------------------------------------------------------------ inference
    def sample(self, backbone, batch: dict[str, Any], state) -> torch.Tensor:
        inputs = batch["vlm"]
        if bool((inputs["labels"] != -100).any()):  # a batch with targets: decode the prompt
            from vlatune.policies.composed.processor import repack, unpack

            prompts, _ = unpack(inputs)
            inputs = repack(inputs, prompts, [[] for _ in prompts], backbone.pad_id)
        r = self.cfg.reasoning
        if r.enabled and r.inference == "generate":
            new = backbone.generate(inputs, state, r.max_new_tokens + self.cfg.max_new_tokens)
        else:
            new = backbone.generate(
                inputs, state, self.cfg.max_new_tokens, allowed=backbone.action_ids
            )
        return torch.from_numpy(self.decode(backbone, new.cpu()))

    def decode(self, backbone, new: torch.Tensor) -> np.ndarray:
        lookup = {int(t): k for k, t in enumerate(backbone.action_ids.tolist())}
        chunks, texts = [], []
        for row in new.tolist():
            if backbone.eos_id in row:
                row = row[: row.index(backbone.eos_id)]
            first = next((i for i, t in enumerate(row) if t in lookup), len(row))
            texts.append(backbone.tokenizer.decode(row[:first], skip_special_tokens=False))
            ids = [lookup[t] for t in row[first:] if t in lookup]
            res = self.tok.decode(ids, self.horizon, self.action_dim)
            if res.ok:
                chunks.append(np.asarray(res.actions, dtype=np.float32))
            else:
                self.decode_failures += 1
                chunks.append(np.broadcast_to(self.safe_action, (self.horizon, self.action_dim)))
        self.last_text = texts
        return np.stack(chunks).astype(np.float32)


def action_vocab(tokenizer) -> int:
    """Number of `<robot_action_k>` tokens an action tokenizer needs."""
    bpe = getattr(tokenizer, "bpe", None)
    return int(bpe.get_vocab_size()) if bpe is not None else int(tokenizer.vocab_size)


def fit_or_load_tokenizer(cfg, chunks: Sequence[np.ndarray] | None):
    from vlatune.policies.tokenizers import BinTokenizer, FastTokenizer

    if cfg.action_tokenizer == "bins":
        return BinTokenizer()
    if cfg.action_tokenizer_path:
        return FastTokenizer.from_pretrained(_local_folder(cfg.action_tokenizer_path))
    if chunks is None or len(chunks) == 0:
        raise ValueError(
            "policy.action_tokenizer 'fast' needs training chunks to fit on, or a fitted folder "
            "in policy.action_tokenizer_path"
        )
    return FastTokenizer.fit(chunks, scale=cfg.fast_scale, vocab_size=cfg.fast_vocab)


def _local_folder(path_or_id: str) -> str:
    """A local folder as is; otherwise a hub id (e.g. physical-intelligence/fast), downloaded."""
    from pathlib import Path

    if Path(path_or_id).exists():
        return path_or_id
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path_or_id)
    except Exception as e:  # offline, unknown repo, no network
        raise FileNotFoundError(
            f"policy.action_tokenizer_path {path_or_id!r} is not a local folder and could not be "
            f"downloaded ({type(e).__name__}: {e}); give a folder with processor_config.json and "
            "tokenizer.json, or leave it empty to fit FAST on the training data"
        ) from None
