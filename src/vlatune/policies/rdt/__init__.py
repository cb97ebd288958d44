"""The `rdt` family: the released RDT-1B (Robotics Diffusion Transformer), loaded bit for bit.

configuration.py (the released init arguments), modeling.py (the architecture), convert.py (the
released `config.json` + `pytorch_model.bin` / `model.safetensors` layout, both directions),
reference.py (the proof against `shared/reference/rdt`), unified.py (LIBERO in the 128-d unified
state / action space). See docs/rdt.md.

    >>> from vlatune.policies.rdt import load_released
    >>> model = load_released("rdt-1b")
"""

from vlatune.policies.rdt.configuration import RDTConfig
from vlatune.policies.rdt.convert import load_released, save_released
from vlatune.policies.rdt.modeling import RDTRunner

__all__ = ["RDTConfig", "RDTRunner", "load_released", "save_released"]
