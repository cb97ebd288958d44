"""The GR00T N1.5 family (NVIDIA Isaac-GR00T N1.5 as vendored by lerobot 0.5.1).

configuration.py (NVIDIA's config.json + the Eagle config), modeling.py (the network),
convert.py (NVIDIA's safetensors layout <-> ours), reference.py (the fixture comparison),
processor.py (image / state / action conventions). Usage:

    >>> from vlatune.policies.groot.convert import load_released
    >>> model, report = load_released("GR00T-N1.5-3B")
"""
