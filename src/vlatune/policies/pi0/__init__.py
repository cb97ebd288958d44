"""The pi0 family: pi0 and pi0.5 (PaliGemma + Gemma action expert, flow matching), LeRobot's layout.

`configuration.py` (both variants, released defaults), `modeling.py` (the architecture),
`convert.py` (LeRobot's `config.json` + `model.safetensors`, both ways), `processor.py` (image,
prompt and padding steps), `policy.py` (compute_loss / predict_chunk / param_groups / save, LoRA),
`reference.py` (the proof against `../shared/reference/pi0`, `pi05`). Guide: docs/pi0.md.

    >>> from vlatune.policies.pi0.convert import load_released
    >>> model, report = load_released("path/to/lerobot_pi05_folder")
"""
