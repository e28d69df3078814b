import hashlib

import numpy as np
import pytest
import torch

from mcvd_diffusers.data import moving_mnist
from mcvd_diffusers.data.mnist import load_mnist
from mcvd_diffusers.data.moving_mnist import MovingMNIST, clips_to_video, load_mnist_test_seq, load_test_set


@pytest.fixture(scope="module")
def digits():
    return load_mnist("train", root="bundled").images


def test_same_seed_same_clips_other_seed_other_clips(digits):
    gen = MovingMNIST(digits)
    a = gen.sample(8, torch.Generator().manual_seed(1))
    b = gen.sample(8, torch.Generator().manual_seed(1))
    c = gen.sample(8, torch.Generator().manual_seed(2))
    assert a.shape == (8, 20, 1, 64, 64) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_digits_move_at_constant_speed_and_bounce_off_the_walls(digits):
    gen = MovingMNIST(digits, num_frames=60)
    pos = gen.trajectories(64, torch.Generator().manual_seed(0)).float()  # (B, T, D, 2)
    free = 64 - 28
    assert pos.min() >= 0 and pos.max() <= free
    step = pos.diff(dim=1)
    # Speed 0.1 * free = 3.6 px per frame, up to pixel rounding (and a shortened step at a bounce).
    speed = step.norm(dim=-1)
    assert (speed <= 3.6 + 1.5).all() and speed.median() > 3.0
    # The direction of an axis reverses only next to a wall.
    flips = (step[:, 1:] * step[:, :-1] < 0)
    at_wall = (pos[:, 1:-1] <= 4) | (pos[:, 1:-1] >= free - 4)
    assert flips.any(), "60 frames must contain bounces"
    assert not (flips & ~at_wall).any()


def test_stochastic_motion_changes_direction_only_at_bounces(digits):
    gen = MovingMNIST(digits, num_digits=1, num_frames=60, motion="stochastic")
    pos = gen.trajectories(64, torch.Generator().manual_seed(0)).float()[:, :, 0]
    step = pos.diff(dim=1)
    free = 64 - 28
    turned = (step[:, 1:] - step[:, :-1]).abs().max(-1).values > 1.5  # more than pixel rounding
    near_wall = ((pos[:, 1:-1] <= 4) | (pos[:, 1:-1] >= free - 4)).any(-1)
    assert turned.any()
    assert not (turned & ~near_wall).any()
    # Unlike a mirror bounce, the tangential component changes too: |step| along the wall axis differs.
    det = MovingMNIST(digits, num_digits=1, num_frames=60).trajectories(64, torch.Generator().manual_seed(0))
    assert not torch.equal(det[:, :, 0].float(), pos)


def test_render_pastes_each_digit_at_its_position(digits):
    gen = MovingMNIST(digits, num_digits=2, num_frames=3)
    images = digits[:2][None]  # (1, 2, 28, 28)
    positions = torch.tensor([[[[0, 0], [36, 36]], [[10, 20], [12, 25]], [[36, 0], [0, 36]]]])
    frames = gen.render(images, positions)
    for t in range(3):
        expected = torch.zeros(64, 64, dtype=torch.uint8)
        for d in range(2):
            r, c = positions[0, t, d].tolist()
            expected[r:r + 28, c:c + 28] = torch.maximum(expected[r:r + 28, c:c + 28], images[0, d])
        assert torch.equal(frames[0, t], expected)


def test_generator_rejects_bad_arguments(digits):
    with pytest.raises(ValueError, match="uint8"):
        MovingMNIST(digits.float())
    with pytest.raises(ValueError, match="motion"):
        MovingMNIST(digits, motion="random")
    with pytest.raises(ValueError, match="image_size"):
        MovingMNIST(digits, image_size=16)
    with pytest.raises(ValueError, match="batch_size"):
        MovingMNIST(digits).sample(0)


def test_fixed_test_set_is_built_once_and_identical(tmp_path):
    first, meta = load_test_set(root="bundled", num_clips=40, cache_dir=tmp_path)
    again, meta_again = load_test_set(root="bundled", num_clips=40, cache_dir=tmp_path)
    other, _ = load_test_set(root="bundled", num_clips=40, seed=7, cache_dir=tmp_path)
    assert meta["path"] == meta_again["path"] and len(list(tmp_path.iterdir())) == 2
    assert first.cache_files and first.cache_files[0]["filename"].startswith(str(tmp_path))  # Arrow, on disk
    clips = first[:]["frames"]
    assert clips.shape == (40, 20, 64, 64) and clips.dtype == torch.uint8
    assert torch.equal(clips, again[:]["frames"])
    assert not torch.equal(clips, other[:]["frames"])
    assert "split test" in meta["data_source"]  # made from MNIST test digits
    video = clips_to_video(clips[:2])
    assert video.shape == (2, 20, 1, 64, 64) and video.max() <= 1


def _write_official_like(path, clips=1003):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(20, clips, 64, 64), dtype=np.uint8)
    np.save(path, array)
    return array


def test_official_file_split_and_layout(tmp_path):
    array = _write_official_like(tmp_path / "mnist_test_seq.npy")
    test = load_mnist_test_seq(tmp_path / "mnist_test_seq.npy", split="test")
    train = load_mnist_test_seq(tmp_path / "mnist_test_seq.npy", split="train")
    assert test.shape == (1000, 20, 64, 64) and train.shape == (3, 20, 64, 64)
    np.testing.assert_array_equal(test[0].numpy(), array[:, 3])  # clip-major, the last 1000 clips
    np.testing.assert_array_equal(train[2, 5].numpy(), array[5, 2])


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((20, 1001, 64, 64), dtype=np.float32), "uint8"),
        (np.zeros((1001, 20, 64, 64), dtype=np.uint8), r"\(20, N, 64, 64\)"),
        (np.zeros((20, 1001, 32, 32), dtype=np.uint8), r"got uint8 \(20, 1001, 32, 32\)"),
        (np.array([{"a": 1}], dtype=object), "not a readable"),
    ],
)
def test_official_file_with_wrong_content_is_rejected(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(ValueError, match=message):
        load_mnist_test_seq(path)


def test_official_file_download_is_verified(tmp_path, monkeypatch):
    source = tmp_path / "served.npy"
    _write_official_like(source)
    digest = hashlib.md5(source.read_bytes()).hexdigest()
    monkeypatch.setattr(moving_mnist, "MNIST_TEST_SEQ_URL", source.as_uri())
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_mnist_test_seq()
    monkeypatch.setattr(moving_mnist, "MNIST_TEST_SEQ_CHECKSUM", "md5:" + "0" * 32)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_mnist_test_seq(download=True)
    monkeypatch.setattr(moving_mnist, "MNIST_TEST_SEQ_CHECKSUM", "md5:" + digest)
    assert load_mnist_test_seq(download=True).shape == (1000, 20, 64, 64)
