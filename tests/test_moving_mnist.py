import hashlib
import json
import logging
import math

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


def _standard_trajectory(y, x, theta, num_frames, canvas_size=64 - 28, step_length=0.1):
    """One digit's path as the standard generator's scalar loop computes it (Srivastava et al. 2015's data code,
    also OpenSTL's loader): step, then clamp onto a wall it reached with the velocity reversed, record, and truncate
    the positions to pixels."""
    v_y, v_x = math.sin(theta), math.cos(theta)
    path = []
    for _ in range(num_frames):
        y, x = y + v_y * step_length, x + v_x * step_length
        if x <= 0:
            x, v_x = 0.0, -v_x
        if x >= 1.0:
            x, v_x = 1.0, -v_x
        if y <= 0:
            y, v_y = 0.0, -v_y
        if y >= 1.0:
            y, v_y = 1.0, -v_y
        path.append((int(canvas_size * y), int(canvas_size * x)))
    return path


def test_deterministic_motion_is_the_standard_generators_rule(digits):
    gen = MovingMNIST(digits, num_digits=2, num_frames=40)
    positions = gen.trajectories(32, torch.Generator().manual_seed(3))  # (B, T, D, 2): rows (y), cols (x)
    # The same draws, in the order trajectories makes them: start (y, x) per digit, then a direction.
    draws = torch.Generator().manual_seed(3)
    start, theta = torch.rand(32, 2, 2, generator=draws), torch.rand(32, 2, generator=draws) * 2 * math.pi
    for b in range(32):
        for d in range(2):
            y, x = start[b, d].tolist()
            expected = _standard_trajectory(y, x, theta[b, d].item(), 40)
            assert positions[:, :, d][b].tolist() == [list(p) for p in expected], (b, d)


def test_a_digit_driven_into_a_wall_stops_at_it_and_comes_back(digits):
    gen = MovingMNIST(digits, num_digits=1, num_frames=60)
    free = 64 - 28
    pos = gen.trajectories(256, torch.Generator().manual_seed(0))[:, :, 0]  # (B, T, 2)
    step = pos.diff(dim=1)
    reversed_ = step[:, 1:] * step[:, :-1] < 0  # an axis whose motion turns between frames t and t+2
    turn_at = pos[:, 1:-1][reversed_]
    assert reversed_.sum() > 100
    # Every turn happens with the digit on the wall itself: clamped there, never mirrored back past it.
    assert ((turn_at == 0) | (turn_at == free)).all()
    # An elastic bounce would leave it short of the wall in most of these frames.
    elastic = MovingMNIST(digits, num_digits=1, num_frames=60, bounce="elastic")
    pos_e = elastic.trajectories(256, torch.Generator().manual_seed(0))[:, :, 0]
    step_e = pos_e.diff(dim=1)
    turn_e = pos_e[:, 1:-1][step_e[:, 1:] * step_e[:, :-1] < 0]
    assert ((turn_e == 0) | (turn_e == free)).float().mean() < 0.5


def test_elastic_bounce_keeps_the_earlier_generator(digits):
    """bounce="elastic" draws what this project drew before test-set format 3: the start position is the first
    frame, walls mirror the overshoot, positions are rounded."""
    gen = MovingMNIST(digits, num_digits=1, num_frames=30, bounce="elastic")
    positions = gen.trajectories(16, torch.Generator().manual_seed(5))[:, :, 0]
    draws = torch.Generator().manual_seed(5)
    start, theta = torch.rand(16, 1, 2, generator=draws)[:, 0], torch.rand(16, 1, generator=draws)[:, 0] * 2 * math.pi
    for b in range(16):
        p = start[b].tolist()
        v = [0.1 * math.sin(theta[b].item()), 0.1 * math.cos(theta[b].item())]
        path = []
        for _ in range(30):
            path.append([round(36 * c) for c in p])
            p = [c + dv for c, dv in zip(p, v)]
            for i in range(2):
                if p[i] < 0 or p[i] > 1:
                    p[i], v[i] = (-p[i] if p[i] < 0 else 2 - p[i]), -v[i]
        assert positions[b].tolist() == path


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
    with pytest.raises(ValueError, match="bounce must be one of"):
        MovingMNIST(digits, bounce="mirror")
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


def test_test_sets_of_an_earlier_format_are_never_used(tmp_path, caplog):
    elastic, meta_elastic = load_test_set(root="bundled", num_clips=8, cache_dir=tmp_path, bounce="elastic")
    # a folder left by a version before format 3 (elastic bounces), as it would sit in the cache
    old = tmp_path / "mmnist-test-0123456789ab"
    old.mkdir()
    (old / "mcvd_test_set.json").write_text(json.dumps({"format": 2, "num_clips": 8}))
    with caplog.at_level(logging.WARNING):
        standard, meta = load_test_set(root="bundled", num_clips=8, cache_dir=tmp_path)
    assert meta["format"] == 3 and meta["bounce"] == "clamp" and meta_elastic["bounce"] == "elastic"
    assert meta["path"] != meta_elastic["path"] and meta["path"] != str(old)
    assert not torch.equal(standard[:]["frames"], elastic[:]["frames"])
    warned = [r.getMessage() for r in caplog.records if "earlier format" in r.getMessage()]
    assert len(warned) == 1 and "mmnist-test-0123456789ab (format 2)" in warned[0]


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
