"""ECoT-style reasoning annotations: TASK, PLAN, VISIBLE OBJECTS, SUBTASK REASONING, SUBTASK,
MOVE REASONING, MOVE, GRIPPER POSITION, per frame.

The `rules` annotator needs no language model: it segments each episode by its gripper events
(approach -> grasp -> carry -> release -> retreat), names the objects from the instruction
("pick up X and place it in Y", "put X on Y", ...; otherwise "the object" / "the target"), and
takes MOVE from proprioception (`vlatune.reasoning.primitives`). VISIBLE OBJECTS and GRIPPER
POSITION need a camera model and object poses: they are filled when a `projector` is given
(LIBERO through the simulator) and omitted otherwise, as the output's `omitted` field says.

Output (`vlatune.data.annotations` format): one row per (episode, frame) with the reasoning
tags, plus the annotator's name, model and the hash of its rules ("prompt").
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlatune.reasoning.primitives import PrimitiveParams, movement_primitives

TAGS = (
    "TASK",
    "PLAN",
    "VISIBLE OBJECTS",
    "SUBTASK REASONING",
    "SUBTASK",
    "MOVE REASONING",
    "MOVE",
    "GRIPPER POSITION",
)
RULES_VERSION = "rules/1: phases approach grasp carry release retreat; 8-frame grasp/release"

_PATTERNS = (
    r"pick up (?:the )?(?P<obj>.+?) and (?:place|put) it (?P<prep>in|on|into|onto|inside|on top of) (?:the )?(?P<target>.+)",
    r"(?:put|place|move|push) (?:the )?(?P<obj>.+?) (?P<prep>in|on|into|onto|inside|on top of|under|to|next to) (?:the )?(?P<target>.+)",
    r"pick up (?:the )?(?P<obj>.+)",
)


@dataclass
class Objects:
    obj: str
    target: str
    prep: str


def parse_instruction(instruction: str) -> Objects:
    text = instruction.strip().lower().rstrip(".")
    for pattern in _PATTERNS:
        m = re.fullmatch(pattern, text)
        if m:
            d = m.groupdict()
            return Objects(
                f"the {d['obj']}",
                f"the {d['target']}" if d.get("target") else "its goal",
                d.get("prep") or "at",
            )
    return Objects("the object", "the target", "at")


def phases(closed: np.ndarray, settle: int = 8) -> list[str]:
    """approach (open, before the first close), grasp (the first `settle` closed frames), carry
    (closed), release (the first `settle` open frames after a carry), retreat (open after)."""
    out, held, since = [], False, 0
    was_closed = False
    for c in closed:
        if c and not was_closed:
            held, since = True, 0
        elif not c and was_closed:
            since = 0
        if c:
            out.append("grasp" if since < settle else "carry")
        elif held:
            out.append("release" if since < settle else "retreat")
        else:
            out.append("approach")
        since += 1
        was_closed = bool(c)
    return out


def _texts(o: Objects) -> dict[str, tuple[str, str, str]]:
    """phase -> (subtask, subtask reasoning, move reasoning)."""
    return {
        "approach": (
            f"reach {o.obj}",
            f"the gripper is empty and {o.obj} is not yet between its fingers",
            f"to bring the open gripper to {o.obj}",
        ),
        "grasp": (
            f"grasp {o.obj}",
            f"the gripper is around {o.obj}",
            f"to close the fingers on {o.obj}",
        ),
        "carry": (
            f"carry {o.obj} to {o.target}",
            f"{o.obj} is held and must go {o.prep} {o.target}",
            f"to move {o.obj} above {o.target}",
        ),
        "release": (
            f"place {o.obj} {o.prep} {o.target}",
            f"{o.obj} is above {o.target}",
            f"to let go of {o.obj}",
        ),
        "retreat": (
            "move away",
            f"{o.obj} is {o.prep} {o.target}; the task is done",
            "to clear the scene",
        ),
    }


def rules_prompt_hash() -> str:
    return hashlib.sha256(RULES_VERSION.encode()).hexdigest()[:16]


def annotate_episode_rules(
    instruction: str,
    states: np.ndarray,
    actions: np.ndarray,
    gripper_dim: int = -1,
    params: PrimitiveParams | None = None,
) -> list[dict[str, str]]:
    """Reasoning tags for every frame of one episode.

    states (T, >= 3): end-effector position first (LIBERO's 8-d state: pos, axis-angle, gripper);
    actions (T, A) in the env gripper convention (+1 close)."""
    states = np.asarray(states, dtype=np.float64)
    actions = np.asarray(actions, dtype=np.float64)
    if states.ndim != 2 or states.shape[1] < 3:
        raise ValueError(
            f"states must be (T, >= 3) with the end-effector position first, got {states.shape}"
        )
    closed = actions[:, gripper_dim] > 0
    axis_angle = states[:, 3:6] if states.shape[1] >= 6 else None
    moves = movement_primitives(states[:, :3], closed, axis_angle, params)
    objects = parse_instruction(instruction)
    texts = _texts(objects)
    steps = phases(closed)
    plan = (
        f"1. reach {objects.obj} 2. grasp {objects.obj} 3. carry {objects.obj} to "
        f"{objects.target} 4. place {objects.obj} {objects.prep} {objects.target}"
    )
    return [frame_tags(instruction, plan, *texts[steps[t]], moves[t]) for t in range(len(states))]


def frame_tags(
    instruction: str, plan: str, subtask: str, why: str, move_why: str, move: str
) -> dict[str, str]:
    """One frame's reasoning in ECoT's tag order."""
    return {
        "TASK": instruction,
        "PLAN": plan,
        "SUBTASK REASONING": why,
        "SUBTASK": subtask,
        "MOVE REASONING": move_why,
        "MOVE": move,
    }


def add_geometry(rows: list[dict[str, str]], seen: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Fill VISIBLE OBJECTS ("name [u0, v0, u1, v1], ...") and GRIPPER POSITION ("[[u, v], ...]",
    the next frames) from per-frame geometry, keeping the tag order."""
    out = []
    for row, g in zip(rows, seen, strict=True):
        row = dict(row)
        if g.get("objects"):
            row["VISIBLE OBJECTS"] = ", ".join(
                f"{n} {list(map(int, b))}" for n, b in g["objects"].items()
            )
        if g.get("gripper"):
            row["GRIPPER POSITION"] = str([[int(u), int(v)] for u, v in g["gripper"]])
        out.append({k: row[k] for k in TAGS if k in row})
    return out


def annotate_dataset_rules(
    reader,
    gripper: str = "auto",
    episodes: Sequence[int] | None = None,
    params=None,
    progress=None,
    annotator=None,
    geometry: Callable[[Any], list[dict[str, Any]] | None] | None = None,
) -> list[dict[str, Any]]:
    """Rows (episode, frame, reasoning) for a dataset reader (`vlatune.data.open_dataset`), from
    the rules or from `annotator` (an object with `annotate_episode(instruction, states,
    actions)`, e.g. `vlatune.reasoning.llm.LLMAnnotator`). `geometry(episode)` may return per
    frame {"gripper": [[u, v], ...], "objects": {name: box}} (LIBERO: `LiberoGeometry`)."""
    from vlatune.conventions import gripper_to_env

    convention = reader.info.gripper if gripper == "auto" else gripper
    frames = []
    todo = list(range(len(reader))) if episodes is None else list(episodes)
    for i, ep in enumerate(todo):
        e = reader.load_episode(ep, cameras=[])
        if e.states is None:
            raise ValueError(
                f"episode {ep} has no states: the rules annotator takes MOVE from the "
                "end-effector position (state[:3])"
            )
        actions = np.asarray(e.actions, dtype=np.float64).copy()
        actions[:, -1] = gripper_to_env(actions[:, -1], convention)
        rows = (
            annotator.annotate_episode(e.instruction, e.states, actions)
            if annotator is not None
            else annotate_episode_rules(e.instruction, e.states, actions, params=params)
        )
        seen = geometry(e) if geometry is not None else None
        if seen is not None:
            rows = add_geometry(rows, seen)
        for t, tags in enumerate(rows):
            frames.append({"episode": ep, "frame": t, "reasoning": tags})
        if progress:
            progress(i + 1, len(todo))
    return frames
