"""The `composed` family: vlatune's backbone x action head composition (`policy.type: composed`,
the default of every recipe written before families existed).

Backbones: `tiny.py` (from scratch, CPU), `hf_vlm.py` (Qwen2-VL / Qwen2.5-VL / NORA, PaliGemma,
SmolVLM through transformers), `rdt_style.py` (SigLIP + T5 condition tokens); heads: `heads.py`
(l1, diffusion, flow), `token_head.py` (FAST / bins tokens), `energy.py` (OFT-style energy
model); `processor.py` holds the family's processor steps (`composed.vlm_inputs`: hf-vlm prompt
ids and vision tensors; `composed.language`: rdt-style T5 embeddings), made per sample in the
loader workers; `policy.py` puts them together (`VLAPolicy`) and saves / loads the vlatune folder.

    >>> from vlatune.policies.composed import VLAPolicy
    >>> policy = VLAPolicy.from_pretrained("runs/demo/checkpoint-2000")
"""

from vlatune.policies.composed.policy import FORMAT, VLAPolicy, build_policy

__all__ = ["FORMAT", "VLAPolicy", "build_policy"]
