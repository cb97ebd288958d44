"""Regeneration: the no-op rule on a hand-made sequence, and a real replay that drops exactly them."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from vlatune.sim.regenerate import noop_keep_mask


def test_noop_rule_on_a_hand_made_sequence():
    z = [0.0] * 6
    actions = np.array(
        [
            [*z, -1],  # first action: norm test only -> no-op
            [0.1, 0, 0, 0, 0, 0, -1],  # moves -> kept
            [*z, -1],  # still, same gripper as the last kept -> no-op
            [*z, 1],  # still, gripper changes -> kept
            [*z, 1],  # still, same gripper as the last kept (+1) -> no-op
            [5e-5, 0, 0, 0, 0, 0, 1],  # below the 1e-4 threshold -> no-op
            [0, 0, 2e-4, 0, 0, 0, 1],  # above it -> kept
        ]
    )
    assert noop_keep_mask(actions).tolist() == [False, True, False, True, False, False, True]


@pytest.mark.sim
def test_regeneration_drops_exactly_the_inserted_noops(tmp_path):
    from click.testing import CliRunner

    from vlatune.cli import cli
    from vlatune.data import open_dataset
    from vlatune.sim.synth import synthesize

    synthesize(
        "libero_object", [0], episodes=1, out=tmp_path / "synth", resolution=64, first_init=3
    )
    (src_file,) = (tmp_path / "synth").glob("*_demo.hdf5")
    raw = tmp_path / "raw"
    raw.mkdir()
    with h5py.File(src_file) as f:
        actions = f["data/demo_0/actions"][()]
        init_state = f["data/demo_0"].attrs["init_state"]
    noop = np.array([0, 0, 0, 0, 0, 0, -1.0])  # the gripper is open at the start
    padded = np.concatenate(
        [noop[None], noop[None], actions[:5], noop[None], noop[None], actions[5:]]
    )
    with h5py.File(raw / src_file.name, "w") as f:
        g = f.create_group("data/demo_0")
        g.create_dataset("actions", data=padded)
        g.attrs["init_state"] = init_state
        g.create_group("obs")
    r = CliRunner().invoke(
        cli,
        [
            "sim",
            "regenerate",
            str(raw),
            str(tmp_path / "regen"),
            "--suite",
            "libero_object",
            "--resolution",
            "64",
        ],
    )
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "regen" / "libero_object_metainfo.json").read_text())
    (demo,) = meta["pick_up_the_alphabet_soup_and_place_it_in_the_basket"].values()
    assert demo["success"] and demo["dropped_noops"] == 4 and demo["kept_frames"] == len(actions)
    ep = open_dataset(tmp_path / "regen").load_episode(0)
    np.testing.assert_array_equal(ep.actions, actions)
    assert ep.images["agentview"].shape == (len(actions), 64, 64, 3)
    summary = json.loads((tmp_path / "regen" / "regenerate_summary.json").read_text())
    assert summary["pick_up_the_alphabet_soup_and_place_it_in_the_basket"]["kept"] == 1
