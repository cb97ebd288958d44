"""Test doubles for tests/test_eval_trust.py, loaded as `tests.trust_policies:<factory>` (also
in worker processes). Each does nothing useful (gripper open); what differs is how it fails."""

from __future__ import annotations

import numpy as np

from vlatune.eval.policies import ENV_CONVENTIONS


class _Base:
    needs_images = False
    conventions = dict(ENV_CONVENTIONS)

    def __init__(self):
        self.trial = None

    def reset(self, ctx):
        self.trial = ctx.trial

    def predict(self, obs):
        return np.array([[0, 0, 0, 0, 0, 0, -1.0]] * 2)

    def describe(self):
        return {"policy": type(self).__name__}


class _RaisesOnOddTrials(_Base):
    """Raises in predict on odd trials, in reset on trial 2; counts a fallback on every other
    query of the others."""

    def __init__(self):
        super().__init__()
        self.queries = 0
        self.safe = 0

    def reset(self, ctx):
        super().reset(ctx)
        if ctx.trial == 2:
            raise LookupError("no plan for this initial state")

    def predict(self, obs):
        if self.trial % 2 == 1:
            raise RuntimeError(f"the policy gave up on trial {self.trial}")
        self.queries += 1
        if self.queries % 2 == 0:
            self.safe += 1
        return super().predict(obs)

    def fallbacks(self):
        return {"undecodable_tokens": self.safe}


def raises_on_odd_trials():
    return _RaisesOnOddTrials()


SHAPES: list[tuple[int, ...]] = []  # image shapes `trained_at_128` was given (in-process)


class _TrainedAt128(_Base):
    needs_images = True
    eval_settings = {"resolution": 128, "replan": 2}

    def predict(self, obs):
        SHAPES.append(tuple(obs["images"]["agentview"].shape))
        return super().predict(obs)


def trained_at_128():
    return _TrainedAt128()
