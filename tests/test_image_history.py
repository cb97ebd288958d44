"""Image history (issue 24): a processor that asks for n consecutive frames (`image_history`,
RDT's 2) gets the earlier frames in training (`FrameDataset.frame`) and at evaluation (the
runner renders the steps before each query; `obs["image_history"]`, also over `vlatune serve`),
with RDT's episode-start rule: no earlier frame, its slots the background, masked."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_fixtures import make_libero_hdf5
from vlatune.data.training import FrameDataset
from vlatune.data.transforms import Normalizer
from vlatune.policies.processor import (
    ProcessedPolicy,
    Processor,
    composed_processor,
    frame_from_observation,
)
from vlatune.policies.rdt.processor import build_processor
from vlatune.policies.rdt.unified import LiberoUnified

CAMS = ["agentview", "wrist"]
T = 6  # frames of the first fixture episode
BACKGROUND = (127, 127, 127)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_libero_hdf5(tmp_path_factory.mktemp("hist") / "data", demos=2, T=T, res=16)


def _norms():
    a = Normalizer("q99", -np.ones(7), np.ones(7), (6,))
    s = Normalizer("q99", -np.ones(8), np.ones(8))
    return a, s


def _dataset(data: Path, processor=None, **kw) -> FrameDataset:
    a, s = _norms()
    return FrameDataset(data, a, s, CAMS, image_size=16, horizon=4, episodes=[0, 1], **kw)


def _rdt(crop_area: float = 1.0, jitter=(0.0, 0.0, 0.0)) -> Processor:
    a, _ = _norms()
    return build_processor(
        LiberoUnified(), 16, BACKGROUND, a, 4, crop_area=crop_area, jitter=jitter
    )


# ------------------------------------------------------------------------------ declaring it
def test_processors_declare_their_history_and_keep_it_in_processor_json(tmp_path):
    a, s = _norms()
    plain = composed_processor(CAMS, 16, a, s)
    assert plain.image_history == 1
    rdt = _rdt()
    assert rdt.image_history == 2 and rdt.training(True).image_history == 2
    rdt.save(tmp_path / "p")
    doc = json.loads((tmp_path / "p" / "processor.json").read_text())
    assert doc["image_history"] == 2
    assert Processor.load(tmp_path / "p").image_history == 2
    # a file written before the key: the current frame only (the policy was trained so)
    del doc["image_history"]
    (tmp_path / "p" / "processor.json").write_text(json.dumps(doc))
    old = Processor.load(tmp_path / "p")
    assert old.image_history == 1 and old.steps[1].history == 2
    doc["image_history"] = 0
    (tmp_path / "p" / "processor.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"processor\.json: key 'image_history' is 0"):
        Processor.load(tmp_path / "p")


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("cache", [False, True])
def test_dataset_gives_the_previous_frame_of_the_same_episode(data, cache):
    a, s = _norms()
    plain = _dataset(data, cache_images=cache)
    ds = _dataset(data, cache_images=cache)
    ds.use_processor(Processor(plain.processor.steps, plain.processor.conventions, image_history=3))
    assert ds.processor.image_history == 3
    for k in range(len(ds)):
        pos, t = ds.locate(k)
        frame = ds.frame(k)
        hist = frame["image_history"]
        assert sorted(hist) == CAMS
        for cam in CAMS:
            # frames t-2, t-1 of the same episode, oldest first; fewer at the episode's start
            want = [plain.frame(k - back)["images"][cam] for back in (2, 1) if t - back >= 0]
            assert len(hist[cam]) == min(t, 2)
            for got, exp in zip(hist[cam], want, strict=True):
                assert got.dtype == np.uint8 and np.array_equal(got, exp)
        assert plain.frame(k).keys() == {*frame} - {"image_history"}
    # k = first frame of episode 1: nothing from episode 0
    assert ds.frame(T)["image_history"] == {c: [] for c in CAMS}


def test_a_processor_without_history_sees_no_history_key(data):
    ds = _dataset(data)
    assert "image_history" not in ds.frame(3)
    seen = []

    class Spy(Processor):
        def __call__(self, frame, rng=None):
            seen.append(set(frame))
            return super().__call__(frame, rng)

    spy = Spy(ds.processor.steps, ds.processor.conventions)
    ds.use_processor(spy)
    ds[3]
    assert "image_history" not in seen[-1]
    obs = {"images": ds.frame(3)["images"], "state": np.zeros(8), "instruction": "x"}
    obs["image_history"] = {c: [np.zeros((16, 16, 3), np.uint8)] for c in CAMS}
    assert "image_history" not in frame_from_observation(obs, CAMS)
    assert "image_history" in frame_from_observation(obs, CAMS, history=2)


def test_history_does_not_change_samples_of_processors_without_it(data):
    """Same seed, same draw: a history-1 chain gives the same sample as before the feature (the
    images step draws nothing more when a frame has no history)."""
    a, s = _norms()
    kw = {"crop_area": 0.8, "jitter": (0.2, 0.2, 0.2), "camera_dropout": 0.3}
    ds1, ds2 = _dataset(data, **kw), _dataset(data, **kw)
    x, y = ds1[4], ds2[4]
    for cam in CAMS:
        assert torch.equal(x["images"][cam], y["images"][cam])
    # with history on, the current images keep their draws (history images are drawn after)
    steps = ds2.processor.steps
    ds2.use_processor(Processor(steps, ds2.processor.conventions, image_history=2))
    z = ds2[4]
    for cam in CAMS:
        assert torch.equal(x["images"][cam], z["images"][cam])
    assert torch.equal(x["image_mask"], z["image_mask"])


def test_rdt_grid_holds_the_previous_frame_and_masks_the_episode_start(data):
    ds = _dataset(data, train=False)
    ds.use_processor(_rdt())
    # frame 3 of episode 0: slots [t-1: agentview, wrist, none | t: agentview, wrist, none]
    s3 = ds[3]
    assert s3["image_mask"].tolist() == [True, True, False, True, True, False]
    s2 = ds[2]
    assert torch.equal(s3["images"][0], s2["images"][3])  # t-1's agentview == frame 2's current
    assert torch.equal(s3["images"][1], s2["images"][4])
    # frame 0: no earlier frame -> background, masked (RDT's rule)
    s0 = ds[0]
    assert s0["image_mask"].tolist() == [False, False, False, True, True, False]
    bg = torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16)
    for i in (0, 1, 2, 5):
        assert torch.equal(s0["images"][i], bg)
    assert not torch.equal(s0["images"][3], bg)


def test_rdt_training_augments_each_history_image_with_its_own_draw(data):
    """RDT's train/dataset.py augments every image of the history independently: the earlier
    frame gets its own crop / jitter, drawn from the sample's rng (reproducible)."""
    ds = _dataset(data, train=True)
    ds.use_processor(_rdt(crop_area=0.6, jitter=(0.3, 0.3, 0.3)))
    frame = ds.frame(3)
    same = dict(frame)
    same["image_history"] = {c: [frame["images"][c]] for c in CAMS}  # t-1 := t's pixels
    a = ds.processor(same, np.random.default_rng(0))
    b = ds.processor(same, np.random.default_rng(0))
    assert torch.equal(a["images"], b["images"])
    assert not torch.equal(a["images"][0], a["images"][3])  # same pixels, other draw
    ev = ds.processor.training(False)(same)
    assert torch.equal(ev["images"][0], ev["images"][3])  # evaluation: deterministic


def test_rdt_clipped_actions_are_counted():
    proc = _rdt()
    chunk = np.zeros((2, 4, 128))
    idx = LiberoUnified().action_indices
    chunk[0, :, idx[0]] = 1.5  # beyond q99 in one query
    actions = proc.postprocess(chunk)
    assert np.allclose(actions[0, :, 0], 1.0) and proc.fallbacks() == {"clipped_actions": 1}
    proc.postprocess(np.zeros((1, 4, 128)))
    assert proc.fallbacks() == {"clipped_actions": 1}


# ------------------------------------------------------------------------------ evaluation
class Recorder:
    """A policy reading `history` frames; records every observation it is given."""

    needs_images = True
    conventions: dict = {}

    def __init__(self, history: int = 2):
        self.image_history = history
        self.seen: list[dict] = []

    def reset(self, ctx) -> None:
        self.seen.clear()

    def predict(self, obs):
        self.seen.append(obs)
        return np.zeros((4, 7))


class FakeEnv:
    """LiberoEnv's interface; the rendered image of step s is filled with s (and -1 unrendered)."""

    cameras = ("agentview", "wrist")
    suite, max_steps = "libero_object", 7
    instruction = "pick"
    task = SimpleNamespace(name="t")
    init_states = [np.zeros(3)]

    def __init__(self):
        self.t, self.renders = 0, []

    def _obs(self, render):
        self.renders.append(render)
        fill = self.t if render else 255
        images = {c: np.full((4, 4, 3), fill, np.uint8) for c in self.cameras} if render else {}
        return {"images": images, "state": np.zeros(8), "instruction": self.instruction}

    def reset(self, init_index, render=True):
        self.t = 0
        return self._obs(render)

    def step(self, action, render=True):
        self.t += 1
        return self._obs(render), False, {}


def _run(policy, replan: int, video: str = "none"):
    from vlatune.eval.runner import EvalSpec, run_episode

    env = FakeEnv()
    spec = EvalSpec(policy="x", tasks=[0], trials=1, replan=replan, max_steps=7, video=video)
    envs = SimpleNamespace(get=lambda suite, task: env, render=True)
    ep = {"id": "e", "suite": "libero_object", "task_id": 0, "trial": 0, "init_index": 0}
    return run_episode(spec, policy, envs, ep), env


@pytest.mark.parametrize(("replan", "history"), [(1, 3), (3, 3), (3, 2), (4, 2)])
def test_runner_passes_the_steps_before_each_query(replan, history):
    policy = Recorder(history=history)
    rec, env = _run(policy, replan)
    assert rec["exception"] is None and rec["steps"] == 7
    queries = list(range(0, 7, replan))
    assert rec["queries"] == len(policy.seen) == len(queries)
    for step, obs in zip(queries, policy.seen, strict=True):
        for cam in FakeEnv.cameras:
            assert obs["images"][cam][0, 0, 0] == step  # the frame of the query step
            past = [int(img[0, 0, 0]) for img in obs["image_history"][cam]]
            assert past == list(range(max(0, step - history + 1), step))  # oldest first
    # renders: reset, then the last `history` steps of each chunk
    want = [True] + [(s - 1) % replan >= replan - history for s in range(1, 8)]
    assert env.renders == want


def test_runner_renders_as_before_for_a_policy_without_history():
    policy = Recorder(history=1)
    del policy.image_history  # getattr default: 1
    rec, env = _run(policy, replan=3)
    assert all("image_history" not in o for o in policy.seen) and rec["queries"] == 3
    assert env.renders == [True, False, False, True, False, False, True, False]
    # a recorded episode renders every step; videos and steps do not depend on history
    with_video, env2 = _run(Recorder(history=2), replan=3, video="all")
    assert all(env2.renders) and with_video["steps"] == 7


# ------------------------------------------------------------------------------ serving
def test_history_crosses_the_wire_and_the_hello_asks_for_it():
    from vlatune.serving.client import PolicyClient, RemotePolicy
    from vlatune.serving.server import PolicyServer
    from vlatune.serving.wire import decode, encode

    past = {"wrist": [np.full((2, 2, 3), 5, np.uint8), np.full((2, 2, 3), 6, np.uint8)]}
    back = decode(encode({"obs": {"image_history": past}}))["obs"]["image_history"]
    assert [img.tolist() for img in back["wrist"]] == [img.tolist() for img in past["wrist"]]

    class Served(Recorder):
        conventions = {"cameras": ["wrist"], "state": "libero_8d"}

        def describe(self):
            return {"policy": "recorder"}

    policy = Served(history=3)
    handle = PolicyServer(policy).start_in_thread()
    try:
        remote = RemotePolicy(handle.url)
        assert remote.image_history == 3
        obs = {
            "images": {"wrist": np.full((2, 2, 3), 7, np.uint8)},
            "state": np.zeros(8),
            "instruction": "x",
            "image_history": past,
        }
        remote.predict(obs)
        got = policy.seen[-1]["image_history"]["wrist"]
        assert [int(i[0, 0, 0]) for i in got] == [5, 6] and got[0].dtype == np.uint8
        remote.predict({k: v for k, v in obs.items() if k != "image_history"})
        assert "image_history" not in policy.seen[-1]
        client = PolicyClient(handle.url)
        bad = {**obs, "image_history": {"wrist": [np.zeros((2, 2), np.uint8)]}}
        with pytest.raises(Exception, match=r"obs\.image_history\.wrist\[0\]"):
            client.predict(bad)
        client.close()
        remote.close()
    finally:
        handle.stop()


class _Tiny(ProcessedPolicy, torch.nn.Module):
    """A ProcessedPolicy over RDT's processor, for the observation path only."""

    def __init__(self, processor):
        torch.nn.Module.__init__(self)
        self.processor = processor
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_rdt_observation_with_history_gives_the_training_sample(data):
    ds = _dataset(data, train=False)
    proc = _rdt()
    ds.use_processor(proc)
    policy = _Tiny(proc)
    assert policy.image_history == 2
    k = 3
    frame = ds.frame(k)
    obs = {
        "images": frame["images"],
        "state": frame["state"],
        "instruction": frame["instruction"],
        "image_history": frame["image_history"],
    }
    train = proc.collate([ds[k]])
    ev = policy.observation_batch([obs])
    for key in ("images", "image_mask", "state", "unified_mask", "ctrl_freq"):
        assert torch.equal(train[key], ev[key]), key
    assert ev["image_mask"][0].tolist() == [True, True, False, True, True, False]
    # the first query of an episode (no earlier frame) is the training sample at t = 0
    first = ds.frame(0)
    assert policy.fallbacks()["missing_image_history"] == 0
    bare = {k: first[k] for k in ("images", "state", "instruction")}
    empty = {**bare, "image_history": {c: [] for c in first["images"]}}  # the runner's first query
    ev0 = policy.observation_batch([empty])
    assert torch.equal(ev0["images"], proc.collate([ds[0]])["images"])
    assert policy.fallbacks()["missing_image_history"] == 0
    # an observation without the key (a caller that does not send earlier frames) is counted
    assert torch.equal(policy.observation_batch([bare])["images"], ev0["images"])
    assert policy.fallbacks()["missing_image_history"] == 1
