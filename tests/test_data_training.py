"""Training view: chunks and padding, normalisation and its inverse, orientation and gripper
conversion, camera dropout, augmentation only at train time, DataLoader workers, annotations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.data_fixtures import make_custom_hdf5, make_libero_hdf5
from vlatune.config import load_config
from vlatune.data import open_dataset
from vlatune.data.convert import convert
from vlatune.data.stats import dataset_stats
from vlatune.data.training import FrameDataset, make_loader
from vlatune.data.transforms import ImageTransform, Normalizer


@pytest.fixture
def libero(tmp_path):
    return make_libero_hdf5(tmp_path / "d", demos=2, T=6, res=32)


def view(path, overrides=(), **kw):
    cfg = load_config(
        None,
        [
            "data.cameras=[agentview, wrist]",
            "data.image_size=32",
            "data.action_horizon=4",
            "data.augment.enabled=false",
            *overrides,
        ],
    )
    ds = open_dataset(path)
    return FrameDataset.from_config(path, cfg.data, dataset_stats(ds), **kw), ds


def test_normalizer_literals():
    stats = {"q01": [0.0, -2.0, -1.0], "q99": [2.0, 2.0, 1.0], "mean": [1, 0, 0], "std": [2, 4, 1]}
    n = Normalizer.from_stats(stats, "q99", keep_dims=[-1])
    np.testing.assert_allclose(
        n(np.array([[0.0, 0.0, -1.0], [2.0, 4.0, 1.0], [1.0, -2.0, 1.0]])),
        [[-1, 0, -1], [1, 1, 1], [0, -1, 1]],
    )
    np.testing.assert_allclose(n.inverse(n(np.array([0.5, 1.0, -1.0]))), [0.5, 1.0, -1.0])
    m = Normalizer.from_stats(stats, "mean_std")
    np.testing.assert_allclose(m(np.array([3.0, 4.0, 0.0])), [1, 1, 0])
    tiny = Normalizer.from_stats({"q01": [1.0], "q99": [1.0]}, "q99")
    assert np.isfinite(tiny(np.array([1.2]))).all()  # a constant dimension cannot divide by zero
    back = Normalizer.from_json(n.to_json())
    x = np.array([1.5, -0.5, 1.0])
    assert back.keep_dims == (2,) and np.array_equal(back(x), n(x))
    with pytest.raises(KeyError, match="needs statistics"):
        Normalizer.from_stats({"mean": [0]}, "q99")


def test_chunk_and_padding_at_the_episode_end(libero):
    ds, reader = view(libero)
    ep = reader.load_episode(0, cameras=[])
    T = ep.length  # 6
    last = ds[T - 2]  # frame 4 of episode 0: 2 real actions, 2 padded
    assert last["episode"] == 0 and last["frame"] == T - 2
    assert last["action_mask"].tolist() == [True, True, False, False]
    expected = ds.action_norm(ep.actions[[T - 2, T - 1, T - 1, T - 1]])
    np.testing.assert_allclose(last["actions"].numpy(), expected)
    np.testing.assert_allclose(
        last["actions"][2], last["actions"][1]
    )  # padding repeats the last action
    first = ds[0]
    assert first["action_mask"].all() and first["actions"].shape == (4, 7)
    assert len(ds) == reader.info.num_frames


def test_actions_and_state_match_the_source_after_inverse(tmp_path):
    # wide quantiles (q01..q99 covers nearly all values) so clipping does not hide a bug
    root = make_libero_hdf5(tmp_path / "d", demos=1, T=200, res=16)
    reader = open_dataset(root)
    stats = dataset_stats(reader)
    stats["action"]["q01"] = [-1.0] * 7
    stats["action"]["q99"] = [1.0] * 7
    cfg = load_config(
        None,
        [
            "data.cameras=[agentview]",
            "data.image_size=16",
            "data.action_horizon=3",
            "data.augment.enabled=false",
        ],
    )
    ds = FrameDataset.from_config(root, cfg.data, stats)
    s = ds[10]
    ep = reader.load_episode(0, cameras=[])
    np.testing.assert_allclose(
        ds.action_norm.inverse(s["actions"].numpy()), ep.actions[10:13], atol=1e-6
    )
    assert s["actions"][:, 6].abs().eq(1).all()  # gripper stays binary
    np.testing.assert_allclose(
        ds.state_norm.inverse(s["state"].numpy()),
        np.clip(ep.states[10], stats["state"]["q01"], stats["state"]["q99"]),
        atol=1e-5,
    )


def test_raw_frames_come_out_upright_and_upright_stay(libero, tmp_path):
    ds, reader = view(libero)  # declared raw
    img = ds[2]["images"]["agentview"].permute(1, 2, 0).numpy()
    assert img.dtype == np.uint8
    src = reader.load_episode(0).images["agentview"][2]
    np.testing.assert_array_equal(img, src[::-1, ::-1])
    convert(reader, tmp_path / "up", "hdf5", image_orientation="upright")
    ds2, _ = view(tmp_path / "up")
    np.testing.assert_array_equal(ds2[2]["images"]["agentview"], ds[2]["images"]["agentview"])
    # asked to treat upright frames as raw, they are rotated (the declaration can be overridden)
    ds3, _ = view(tmp_path / "up", ["data.image_orientation=raw"])
    np.testing.assert_array_equal(
        ds3[2]["images"]["agentview"], ds[2]["images"]["agentview"].flip(1, 2)
    )


def test_gripper_is_converted_to_the_env_convention(tmp_path):
    root = make_custom_hdf5(
        tmp_path / "c",
        mapping="action: action\ncameras: {camera1: observations/images/camera1}\nfps: 10\ngripper: '1_open'\ndefault_instruction: x\n",
    )
    reader = open_dataset(root)
    stats = dataset_stats(reader)
    cfg = load_config(
        None,
        [
            "data.cameras=[camera1]",
            "data.image_size=16",
            "data.action_horizon=1",
            "data.augment.enabled=false",
        ],
    )
    ds = FrameDataset.from_config(root, cfg.data, stats)
    raw = reader.load_episode(0, cameras=[]).actions[0, -1]
    assert ds[0]["actions"][0, -1].item() == pytest.approx(
        -raw
    )  # 1_open stored -> env sign flipped


def test_camera_dropout_keeps_at_least_k(libero):
    ds, _ = view(libero, ["data.camera_dropout=0.9", "data.min_cameras=1"])
    masks = torch.stack([ds[i % len(ds)]["image_mask"] for i in range(300)])
    assert masks.sum(1).min() >= 1
    assert (~masks).any()  # cameras do get dropped
    dropped = ds[0]
    for cam, on in zip(ds.cameras, dropped["image_mask"].tolist(), strict=True):
        if not on:
            assert dropped["images"][cam].abs().sum() == 0
    ev, _ = view(libero, ["data.camera_dropout=0.9"], train=False)
    assert all(ev[i]["image_mask"].all() for i in range(len(ev)))  # never at evaluation


def test_augmentation_only_at_train_time():
    img = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    train = ImageTransform(
        32, crop_area=0.9, train=True, brightness=0.3, rng=np.random.default_rng(0)
    )
    assert not torch.equal(train(img), train(img))
    test = ImageTransform(32, crop_area=0.9, train=False)
    assert torch.equal(test(img), test(img))
    assert test.crop_box(40, 40) == (1, 1, 39, 39)  # centred, 0.9 of the area (38x38)


@pytest.mark.parametrize("source", [128, 256])
def test_resize_matches_pil_bilinear(source):
    """The vectorised torch resize gives PIL's bilinear (antialiased) result, up- and down-
    sampling, so frames look the same whichever produced them (checkpoints stay valid)."""
    from PIL import Image

    yy, xx = np.mgrid[0:source, 0:source] / source
    img = np.stack([255 * xx, 255 * yy, 127 + 100 * np.sin(12 * xx * yy)], -1).astype(np.uint8)
    ours = ImageTransform(224)(img).permute(1, 2, 0).numpy().astype(int)
    pil = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR)).astype(int)
    assert ours.shape == pil.shape == (224, 224, 3)
    assert np.abs(ours - pil).max() <= 2 and np.abs(ours - pil).mean() < 0.5


def test_colour_jitter_is_brightness_contrast_saturation_composed():
    img = np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    tf = ImageTransform(
        24, train=True, brightness=0.3, contrast=0.3, saturation=0.3, rng=np.random.default_rng(4)
    )
    out = tf(img).permute(1, 2, 0).numpy().astype(np.float64)
    b, c, s = np.random.default_rng(4).uniform(0.7, 1.3, 3)  # the same draws, in order
    x = img.astype(np.float64)
    grey = lambda y: y @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    x = b * x  # brightness
    x = c * (x - grey(x).mean()) + grey(x).mean()  # contrast around the mean grey level
    x = s * (x - grey(x)[..., None]) + grey(x)[..., None]  # saturation around each pixel's grey
    np.testing.assert_allclose(out, np.clip(x, 0, 255), atol=1.0)
    assert np.abs(out - img).mean() > 3  # it did change the image

    # with a crop, the jitter is of the whole frame (contrast pivots on the frame's mean grey),
    # then cropped: the order every recipe was trained with
    kw = dict(train=True, brightness=0.3, contrast=0.3, saturation=0.3)
    whole = ImageTransform(24, **kw, rng=np.random.default_rng(4))(img)
    rng = np.random.default_rng(4)
    rng.uniform(0.7, 1.3, 3)  # the jitter's draws, then the crop's
    top, left = int(rng.integers(0, 13)), int(rng.integers(0, 13))
    cropped = ImageTransform(12, crop_area=0.25, **kw, rng=np.random.default_rng(4))(img)
    assert torch.equal(cropped, whole[:, top : top + 12, left : left + 12])


def test_dataloader_with_workers_and_lerobot_video(libero, tmp_path):
    convert(open_dataset(libero), tmp_path / "lr", "lerobot")
    ds, _ = view(tmp_path / "lr", ["data.augment.enabled=true"])
    ds[0]  # the parent decodes video first: workers must still start cleanly
    loader = make_loader(ds, batch_size=4, num_workers=2)
    batch = next(iter(loader))
    assert batch["images"]["wrist"].shape == (4, 3, 32, 32) and batch["actions"].shape == (4, 4, 7)
    assert len(batch["instruction"]) == 4


def test_annotations_join_by_episode_and_frame(libero):
    ds, _ = view(libero, annotations={(1, 3): {"reasoning": "MOVE: forward"}})
    k = ds._starts[1] + 3
    assert ds[int(k)]["reasoning"] == "MOVE: forward"
    assert "reasoning" not in ds[0]


def test_unknown_camera_is_a_clear_error(libero):
    with pytest.raises(Exception, match=r"camera\(s\) \['top'\] not in the dataset"):
        view(libero, ["data.cameras=[top]"])
