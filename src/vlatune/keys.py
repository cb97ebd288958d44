"""Key names of the observation contract, defined once.

An observation (from the simulator, or one frame of a dataset) is a dict:

- `images`: {camera short name ("agentview", "wrist"): uint8 (H, W, 3), upright}
- `state`: float32 (8,) = eef_pos (3) + eef axis-angle (3) + gripper_qpos (2)
- `instruction`: str, the task's language instruction

Actions are float (7,) in the env convention (gripper -1 open, +1 close); chunks are (H, 7).
"""

IMAGES = "images"
STATE = "state"
INSTRUCTION = "instruction"
ACTION = "action"
