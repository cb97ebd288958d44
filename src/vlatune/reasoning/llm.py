"""The `openai` ECoT annotator: PLAN, SUBTASK and the reasons from a language model through an
OpenAI-compatible chat-completions API.

Connection from the environment only (never the command line, never logged):
`VLATUNE_LLM_BASE_URL` (or `OPENAI_BASE_URL`), `VLATUNE_LLM_API_KEY` (or `OPENAI_API_KEY`);
the model from `--model` or `VLATUNE_LLM_MODEL`.

One request per episode: the instruction, the objects named in it and the movement primitives
computed from proprioception (runs of equal MOVE with their frame ranges). The reply must use
the tagged format below; it is parsed and validated (every frame covered exactly once, every
field present), and a reply that does not validate is an error that caches nothing. Replies are
cached on disk by sha256(model, prompt), so re-running only asks for what is missing (resume);
rate limits and server errors are retried with exponential back-off by the `openai` client
(`max_retries`, honouring Retry-After).

    PLAN: 1. ... 2. ...
    SEGMENT 0-17: SUBTASK: ... | SUBTASK REASONING: ... | MOVE REASONING: ...
    SEGMENT 18-40: ...
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from vlatune.reasoning.ecot import frame_tags, parse_instruction
from vlatune.reasoning.primitives import PrimitiveParams, movement_primitives

SYSTEM = (
    "You annotate robot demonstrations with embodied chain-of-thought. Answer only in the "
    "requested format, one line per item, no other text."
)
PROMPT_VERSION = "ecot-openai/1"
_SEGMENT = re.compile(
    r"SEGMENT\s+(\d+)\s*-\s*(\d+)\s*:\s*SUBTASK:\s*(.+?)\s*\|\s*SUBTASK REASONING:\s*(.+?)\s*\|\s*"
    r"MOVE REASONING:\s*(.+?)\s*$"
)


class MalformedReply(ValueError):
    """The model's reply does not follow the tagged format."""


def runs(moves: list[str]) -> list[tuple[int, int, str]]:
    """Consecutive equal primitives -> (first frame, last frame, primitive)."""
    out: list[tuple[int, int, str]] = []
    for t, m in enumerate(moves):
        if out and out[-1][2] == m:
            out[-1] = (out[-1][0], t, m)
        else:
            out.append((t, t, m))
    return out


def build_prompt(instruction: str, moves: list[str]) -> str:
    o = parse_instruction(instruction)
    lines = [
        f"Task instruction: {instruction}",
        f"Objects: {o.obj} (to manipulate), {o.target} (goal)",
        f"The episode has {len(moves)} frames (0..{len(moves) - 1}). Gripper movements:",
        *[f"  frames {a}-{b}: {m}" for a, b, m in runs(moves)],
        "",
        "Write a high-level PLAN, then split the frames into consecutive segments, one per "
        "subtask, covering every frame exactly once in order. Format:",
        "PLAN: 1. <step> 2. <step> ...",
        "SEGMENT <first>-<last>: SUBTASK: <subtask> | SUBTASK REASONING: <why this subtask now> "
        "| MOVE REASONING: <why the gripper moves like this>",
    ]
    return "\n".join(lines)


def parse_reply(text: str, T: int) -> tuple[str, list[tuple[int, int, str, str, str]]]:
    plan = None
    segments = []
    for line in (text or "").splitlines():
        line = line.strip()
        if line.startswith("PLAN:"):
            plan = line[5:].strip()
        elif line.startswith("SEGMENT"):
            m = _SEGMENT.match(line)
            if not m:
                raise MalformedReply(f"cannot parse segment line: {line[:120]!r}")
            a, b = int(m.group(1)), int(m.group(2))
            segments.append((a, b, m.group(3), m.group(4), m.group(5)))
    if not plan:
        raise MalformedReply("the reply has no 'PLAN:' line")
    if not segments:
        raise MalformedReply("the reply has no 'SEGMENT a-b:' lines")
    expect = 0
    for a, b, *_ in segments:
        if a != expect or b < a:
            raise MalformedReply(
                f"segments must cover frames 0..{T - 1} in order without gaps; got {a}-{b} "
                f"where frame {expect} was expected"
            )
        expect = b + 1
    if expect != T:
        raise MalformedReply(f"segments end at frame {expect - 1}, the episode has {T} frames")
    return plan, segments


class LLMAnnotator:
    def __init__(
        self,
        model: str | None,
        cache_dir: Path,
        params: PrimitiveParams | None = None,
        max_retries: int = 5,
        timeout: float = 60.0,
    ):
        try:
            import openai
        except ImportError:
            raise ImportError(
                "the openai annotator needs the openai package: pip install openai"
            ) from None
        base = os.environ.get("VLATUNE_LLM_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        key = os.environ.get("VLATUNE_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.model = model or os.environ.get("VLATUNE_LLM_MODEL")
        if not key:
            raise RuntimeError(
                "set VLATUNE_LLM_API_KEY (or OPENAI_API_KEY) in the environment for --llm openai "
                "(keys are never read from the command line)"
            )
        if not self.model:
            raise RuntimeError("name the model with --model or VLATUNE_LLM_MODEL")
        self.client = openai.OpenAI(
            base_url=base, api_key=key, max_retries=max_retries, timeout=timeout
        )
        self.cache_dir = Path(cache_dir)
        self.params = params
        self.requests = 0

    def _key(self, prompt: str) -> str:
        return hashlib.sha256(
            f"{PROMPT_VERSION}\n{self.model}\n{SYSTEM}\n{prompt}".encode()
        ).hexdigest()

    def _ask(self, prompt: str) -> str:
        f = self.cache_dir / f"{self._key(prompt)[:32]}.json"
        if f.is_file():
            return json.loads(f.read_text())["reply"]
        self.requests += 1
        reply = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            temperature=0.0,
        )
        return reply.choices[0].message.content or ""

    def _store(self, prompt: str, reply: str) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        f = self.cache_dir / f"{self._key(prompt)[:32]}.json"
        from vlatune.fsutil import write_text

        write_text(f, json.dumps({"model": self.model, "prompt": prompt, "reply": reply}))

    def annotate_episode(
        self, instruction: str, states: np.ndarray, actions: np.ndarray
    ) -> list[dict[str, str]]:
        states = np.asarray(states, dtype=np.float64)
        closed = np.asarray(actions)[:, -1] > 0
        moves = movement_primitives(
            states[:, :3], closed, states[:, 3:6] if states.shape[1] >= 6 else None, self.params
        )
        prompt = build_prompt(instruction, moves)
        reply = self._ask(prompt)
        plan, segments = parse_reply(reply, len(moves))  # raises before anything is cached
        self._store(prompt, reply)
        return [
            frame_tags(instruction, plan, subtask, why, move_why, moves[t])
            for a, b, subtask, why, move_why in segments
            for t in range(a, b + 1)
        ]

    @property
    def prompt_hash(self) -> str:
        return hashlib.sha256(f"{PROMPT_VERSION}\n{SYSTEM}".encode()).hexdigest()[:16]
