"""NORA (`declare-lab/nora`, `declare-lab/nora-long`): Qwen2.5-VL-3B with FAST+ action tokens
`<robot_action_k>` at 151665 + k. `configuration.py` (constants), `processor.py` (NORA's prompt,
labels, id mapping, gripper and statistics rules), `modeling.py` (`NoraPolicy`), `convert.py`
(detect and load a released folder), `family.py` (`policy.type: nora`: build, load, the
processor-backed `NoraFamilyPolicy`). See docs/nora.md."""
