"""The `openvla` family: OpenVLA (Prismatic, `openvla/openvla-7b`) and OpenVLA-OFT.

configuration.py (released config.json + OFT constants), modeling.py (fused DINOv2 + SigLIP with
optional FiLM, projector, Llama; OFT's parallel-decoding pass and DDIM loop), oft_heads.py (L1
and diffusion heads, proprio / noisy-action projectors), convert.py (released layout, strict
key map), reference.py (fixture comparison). See docs/openvla.md.

    >>> from vlatune.policies.openvla.convert import load_released
    >>> vla, heads = load_released("openvla-7b")
"""
