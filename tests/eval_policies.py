"""Policies for the eval runner tests, loaded as `tests.eval_policies:<factory>`."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np

from vlatune.eval.policies import ENV_CONVENTIONS, ScriptedPolicy

MARKER = Path(os.environ.get("VLATUNE_TEST_TMP", "/tmp")) / "crash-once"


class _Crashing(ScriptedPolicy):
    def __init__(self, always: bool):
        super().__init__()
        self.always = always

    def predict(self, obs):
        if self.always or not MARKER.exists():
            MARKER.touch()
            os.kill(os.getpid(), signal.SIGSEGV)  # as MuJoCo or a GL driver would
        return super().predict(obs)


def crash_once():
    return _Crashing(always=False)


def crash_always():
    return _Crashing(always=True)


class _Still:
    """Does nothing, gripper open; declares whatever conventions it is given."""

    needs_images = False

    def __init__(self, **conventions):
        self.conventions = {**ENV_CONVENTIONS, **conventions}

    def reset(self, ctx):
        pass

    def predict(self, obs):
        return np.array([[0, 0, 0, 0, 0, 0, -1.0]] * 4)

    def describe(self):
        return {"policy": "still", "conventions": self.conventions}


def still():
    return _Still()


def raw_images():
    return _Still(image_orientation="raw")


def no_stats():
    return _Still(normalization_stats=False)


SEEN: list[tuple[str, ...]] = []  # cameras of each observation `looking` was given (in-process)


class _Looking(_Still):
    """Like `still`, but reads images: records which cameras each query observation had."""

    needs_images = True

    def predict(self, obs):
        SEEN.append(tuple(sorted(obs["images"])))
        return super().predict(obs)


def looking():
    return _Looking()
