"""Policies `vlatune eval` can run, behind one small interface.

A policy declares the conventions it expects (checked against the environment before any
episode runs), is `reset` at the start of each episode with the episode's context, and
`predict`s an action chunk (H, 7) in the env convention from an observation
(`vlatune.keys`: upright images, 8-d state, instruction).

Optional members a policy may have (the runner uses them when present):
- `fallbacks() -> dict[str, int]`: cumulative counters of the queries the policy answered by a
  fallback instead of its model's output (e.g. `undecodable_tokens`: a token sequence that did
  not decode, replaced by the safe action; `clipped_actions`: a chunk clipped to the training
  range). Counters only grow; the runner records each episode's increase in episodes.jsonl and
  sums them per task ("fallbacks: k of n queries"), warning above 1% of the queries.
- `eval_settings -> dict`: the evaluation settings the policy was trained for (`resolution`,
  `replan`, `cameras`); a training checkpoint carries its config's `eval` section, and
  `vlatune eval` uses these unless a flag overrides them (recorded in run.json, warned about).

Specs:
- a folder: a trained policy (`Policy.save` folder, or a training `checkpoint-<step>/`);
- `scripted`: the privileged pick-and-place expert (`vlatune.sim.expert`), for checking the
  runner and making demonstrations; it reads the simulator, so it is not a learned policy;
- `replay:DATASET`: replays the recorded actions of the demo whose initial state matches the
  episode's (a correct runner gets about 100% on clean demos);
- `package.module:factory`: any callable returning an object with this interface (your own
  policy, or a test double);
- `ws://HOST:PORT[?timeout=SECONDS]`: a policy served by `vlatune serve` (vlatune.serving).

    >>> policy = load_policy("replay:data/synth")
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vlatune.conventions import ENV_CONVENTIONS, gripper_to_env  # noqa: F401 (re-exported)


@dataclass
class EpisodeContext:
    suite: str
    task_id: int
    task_name: str
    instruction: str
    trial: int
    init_index: int
    init_state: np.ndarray
    env: Any = field(
        repr=False
    )  # the LiberoEnv: privileged built-ins read it, learned policies must not


class Policy(Protocol):
    conventions: dict[str, Any]
    needs_images: bool

    def reset(self, ctx: EpisodeContext) -> None: ...

    def predict(self, obs: dict[str, Any]) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...

    # optional: def fallbacks(self) -> dict[str, int]; eval_settings: dict[str, Any];
    # image_history: int (consecutive frames read, default 1: the runner then passes the
    # earlier ones as obs["image_history"] {camera: [frames oldest first]})


def checkpoint_eval_settings(path: str | Path) -> dict[str, Any] | None:
    """The evaluation settings a training checkpoint was made for: its config's `eval`
    section (render resolution, replan) and the cameras trained on, from `trainer_state.json`
    of `path` (a `checkpoint-<step>/`) or of its parent (its `policy/` folder); None for a
    policy folder saved on its own."""
    path = Path(path)
    for folder in (path, path.parent):
        state_file = folder / "trainer_state.json"
        if state_file.is_file():
            try:
                config = json.loads(state_file.read_text())["config"]
                ev = config["eval"]
                out = {"resolution": int(ev["resolution"]), "replan": int(ev["replan"])}
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{state_file}: cannot read the training config's eval section "
                    f"(config.eval.resolution / replan): {e}"
                ) from None
            cameras = (config.get("data") or {}).get("cameras")
            if cameras:
                out["cameras"] = list(cameras)
            return out
    return None


def config_hash(description: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps(description, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]


class ScriptedPolicy:
    """The privileged expert as a policy: one action per query."""

    conventions = dict(ENV_CONVENTIONS)
    needs_images = False

    def __init__(self) -> None:
        self.expert = None

    def reset(self, ctx: EpisodeContext) -> None:
        from vlatune.sim.expert import ScriptedExpert

        self.expert = ScriptedExpert(ctx.env)

    def predict(self, obs: dict[str, Any]) -> np.ndarray:
        return self.expert.act()[None]

    def describe(self) -> dict[str, Any]:
        from dataclasses import asdict

        from vlatune.sim.expert import ExpertParams

        return {"policy": "scripted", "params": asdict(ExpertParams())}


class ReplayPolicy:
    """Recorded actions of the demo whose initial state matches the episode's, in chunks."""

    needs_images = False

    def __init__(self, path: str | Path, chunk: int = 8):
        from vlatune.data import open_dataset

        self.path = Path(path)
        reader = open_dataset(self.path)
        self.gripper = reader.info.gripper
        self.conventions = dict(
            ENV_CONVENTIONS
        )  # actions are converted to the env convention below
        self.chunk = chunk
        self._demos: list[
            tuple[str, np.ndarray, np.ndarray]
        ] = []  # (instruction, init state, actions)
        for i in range(len(reader)):
            ep = reader.load_episode(i, cameras=[])
            if "init_state" not in ep.meta:
                raise ValueError(
                    f"{reader.episode_source(i)}: replay needs each demo's initial state (LIBERO HDF5 'init_state')"
                )
            actions = np.asarray(ep.actions, dtype=np.float64).copy()
            actions[:, -1] = gripper_to_env(actions[:, -1], self.gripper)
            self._demos.append((ep.instruction, np.asarray(ep.meta["init_state"]), actions))
        reader.close()
        self._actions: np.ndarray | None = None
        self._t = 0

    def reset(self, ctx: EpisodeContext) -> None:
        best, best_err = None, np.inf
        for instruction, init, actions in self._demos:
            if instruction != ctx.instruction or init.shape != ctx.init_state.shape:
                continue
            err = float(np.max(np.abs(init - ctx.init_state)))
            if err < best_err:
                best, best_err = actions, err
        if best is None or best_err > 1e-6:
            raise LookupError(
                f"{self.path}: no demo of '{ctx.instruction}' starts from init state {ctx.init_index}"
            )
        self._actions, self._t = best, 0

    def predict(self, obs: dict[str, Any]) -> np.ndarray:
        if self._t >= len(self._actions):
            return np.array([[0, 0, 0, 0, 0, 0, -1.0]])  # the demo is over: stay still
        chunk = self._actions[self._t : self._t + self.chunk]
        self._t += len(chunk)
        return chunk

    def describe(self) -> dict[str, Any]:
        return {"policy": "replay", "dataset": str(self.path.resolve()), "demos": len(self._demos)}


def load_policy(spec: str) -> Policy:
    if spec == "scripted":
        return ScriptedPolicy()
    if spec.startswith("replay:"):
        return ReplayPolicy(spec[len("replay:") :])
    if spec.startswith(("ws://", "wss://")):  # a `vlatune serve` server (vlatune.serving)
        from vlatune.serving.client import RemotePolicy

        return RemotePolicy.from_spec(spec)
    if Path(spec).is_dir():
        from vlatune.policies import load  # the family is detected from the folder's files

        policy = load(spec)
        if not callable(getattr(policy, "predict", None)):
            from vlatune.policies.io import not_evaluable_reason

            raise ValueError(not_evaluable_reason(spec))
        policy.eval_settings = checkpoint_eval_settings(spec)
        return policy
    if ":" in spec and not Path(spec).exists():
        module, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"policy '{spec}': cannot import {attr} from {module} ({e})") from None
        return factory()
    raise ValueError(
        f"unknown policy '{spec}': use a policy or checkpoint folder, 'scripted', "
        "'replay:DATASET' or 'package.module:factory'"
    )


def check_conventions(policy: Policy) -> None:
    """A mismatch between what the policy expects and what the env gives is an error, before any episode."""
    declared = getattr(policy, "conventions", None)
    if not isinstance(declared, dict):
        raise ValueError(
            "the policy declares no conventions (image_orientation, gripper, state, action_dim)"
        )
    problems = [
        f"{k}: policy {declared.get(k)!r}, env {v!r}"
        for k, v in ENV_CONVENTIONS.items()
        if declared.get(k) != v
    ]
    if declared.get("normalization_stats") is False:
        problems.append(
            "normalization_stats: the policy has none saved (train-time statistics are needed)"
        )
    if problems:
        raise ValueError("policy and LIBERO env disagree on conventions: " + "; ".join(problems))
