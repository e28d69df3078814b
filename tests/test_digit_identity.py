"""Digit identity: the test set's record of where each digit is, the shipped classifier, the overlap rule."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from mcvd_diffusers import digit_classifier
from mcvd_diffusers.config import TrainConfig, build_unet
from mcvd_diffusers.data.mnist import load_mnist
from mcvd_diffusers.data.moving_mnist import MovingMNIST, build_test_set, clip_layout, clips_to_video, load_test_set
from mcvd_diffusers.digit_classifier import (DigitClassifier, DigitIdentity, crop_windows, digit_accuracy,
                                             load_digit_classifier, readable_digits)
from mcvd_diffusers.validation import PREDICTED_FRAMES, ValidationSet

# sha256 of the frames of build_test_set(bundled MNIST test digits, num_clips=8, bounce="elastic"), as generated
# before the test set recorded positions: recording the layout must not change a single pixel (cached results depend
# on them), and the elastic generator must draw what test-set formats 1 and 2 held.
BUNDLED_TEST_SET_8_SHA256 = "9d337d43fcb3401f6d3b5610d9d2db11b319e30cf0f701d93028664638af267b"


@pytest.fixture(scope="module")
def test_digits():
    return load_mnist("test", root="bundled")


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier()


@pytest.fixture(scope="module")
def generated(test_digits):
    """64 clips of the fixed test set's recipe: uint8 frames (N, T, H, W), positions (N, T, D, 2), labels (N, D)."""
    dataset = build_test_set(test_digits, num_clips=64)
    positions, labels = clip_layout(dataset)
    return dataset.with_format("torch", dtype=torch.uint8)[:]["frames"], positions, labels


def _digit_index(images: torch.Tensor, window: torch.Tensor) -> int:
    matches = (images == window).flatten(1).all(-1).nonzero().flatten()
    assert len(matches) >= 1, "the window at the recorded position is no MNIST digit"
    return int(matches[0])


def test_frames_are_unchanged_by_recording_the_layout(test_digits):
    # bounce="elastic" is the generator of test-set formats 1 and 2: the frames those sets held, bit for bit
    frames = build_test_set(test_digits, num_clips=8, bounce="elastic").with_format("numpy")[:]["frames"]
    assert hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest() == BUNDLED_TEST_SET_8_SHA256
    gen = MovingMNIST(test_digits.images, labels=test_digits.labels, motion="stochastic", num_digits=3)
    plain = gen.sample(6, torch.Generator().manual_seed(3))
    with_layout, positions, labels = gen.sample(6, torch.Generator().manual_seed(3), return_layout=True)
    assert torch.equal(plain, with_layout)
    assert positions.shape == (6, 20, 3, 2) and labels.shape == (6, 3)
    assert MovingMNIST(test_digits.images).sample(2, return_layout=True)[2] is None  # made without labels


def test_positions_and_labels_are_where_and_what_the_digits_are(generated, test_digits):
    frames, positions, labels = generated
    alone = readable_digits(positions, max_overlap=0.0)  # windows that touch no other digit's window
    windows = crop_windows(frames, positions)  # (N, T, D, 28, 28)
    checked = 0
    for n, t, d in alone.nonzero().tolist()[::3]:
        index = _digit_index(test_digits.images, windows[n, t, d])
        assert test_digits.labels[index] == labels[n, d]
        checked += 1
    assert checked > 50
    # every digit's window holds exactly its digit wherever it is alone, in every such frame
    n, t, d = alone.nonzero()[0].tolist()
    image = windows[n, t, d]
    for t2 in alone[n, :, d].nonzero().flatten().tolist():
        assert torch.equal(windows[n, t2, d], image)
    # and a position off by a pixel is not where the digit is
    shifted = positions.clone()
    shifted[..., 0] = torch.where(shifted[..., 0] > 0, shifted[..., 0] - 1, shifted[..., 0] + 1)
    assert not torch.equal(crop_windows(frames, shifted)[n, t, d], image)


def test_the_stored_test_set_records_the_layout(tmp_path):
    dataset, meta = load_test_set(root="bundled", num_clips=12, cache_dir=tmp_path)
    positions, labels = clip_layout(dataset)
    assert positions.shape == (12, 20, 2, 2) and labels.shape == (12, 2) and positions.dtype == torch.int64
    assert 0 <= positions.min() and positions.max() <= 64 - 28 and 0 <= labels.min() and labels.max() <= 9
    assert meta["format"] == 3
    rebuilt = build_test_set(load_mnist("test", root="bundled"), num_clips=12)
    expected = clip_layout(rebuilt)
    assert torch.equal(positions, expected[0]) and torch.equal(labels, expected[1])


def test_a_cached_test_set_without_positions_is_regenerated(tmp_path):
    import datasets

    _, meta = load_test_set(root="bundled", num_clips=10, cache_dir=tmp_path)
    folder = tmp_path / meta["path"].split("/")[-1]
    frames_only = build_test_set(load_mnist("test", root="bundled"), num_clips=10).remove_columns(["positions",
                                                                                                    "labels"])
    saved_meta = (folder / "mcvd_test_set.json").read_text()
    shutil.rmtree(folder)
    frames_only.save_to_disk(str(folder))  # what the earlier version wrote, under this version's name
    (folder / "mcvd_test_set.json").write_text(saved_meta)
    assert clip_layout(datasets.load_from_disk(str(folder))) is None
    dataset, again = load_test_set(root="bundled", num_clips=10, cache_dir=tmp_path)
    assert again["path"] == meta["path"] and clip_layout(dataset) is not None
    assert torch.equal(dataset[:]["frames"], frames_only.with_format("torch", dtype=torch.uint8)[:]["frames"])
    inode = (folder / "mcvd_test_set.json").stat().st_ino
    load_test_set(root="bundled", num_clips=10, cache_dir=tmp_path)
    assert (folder / "mcvd_test_set.json").stat().st_ino == inode  # one with positions is reused, not rebuilt

    # a folder of the earlier format (no "format" in its key) is never taken for one with positions
    old_meta = {k: v for k, v in json.loads(saved_meta).items() if k != "format"}
    key = hashlib.sha256(json.dumps({k: v for k, v in old_meta.items() if k != "data_source"},
                                    sort_keys=True).encode()).hexdigest()[:12]
    assert f"mmnist-test-{key}" != folder.name


def test_the_shipped_classifier_is_small_and_documented():
    card = digit_classifier.classifier_card()
    size = digit_classifier.WEIGHTS.stat().st_size
    assert size < 1_000_000 and card["size_bytes"] == size
    assert card["sha256"] == digit_classifier.weights_sha256()
    assert card["mnist_test_accuracy"] >= 0.98
    for key in ("command", "training_seconds", "cpu", "threads"):
        assert card[key]


def test_the_shipped_classifier_reads_mnist_digits(classifier, test_digits):
    images = test_digits.images[:, None].float() / 255
    with torch.no_grad():
        predicted = classifier(images).argmax(-1)
    assert (predicted == test_digits.labels).float().mean() > 0.97


def test_ground_truth_windows_are_read_and_noise_is_not(classifier, generated):
    frames, positions, labels = generated
    video = clips_to_video(frames)
    truth = digit_accuracy(classifier, video, positions, labels)
    assert truth.shape == (64, 20)
    assert truth.nanmean() > 0.9
    noise = digit_accuracy(classifier, torch.rand(video.shape, generator=torch.Generator().manual_seed(0)),
                           positions, labels)
    assert noise.nanmean() < 0.3
    swapped = digit_accuracy(classifier, video, positions, (labels + 1) % 10)  # every label wrong
    assert swapped.nanmean() < 0.1


def test_overlapping_digits_are_left_out():
    # (B=1, F=5, D=2): same place; 8,8 apart (400 px of 784 shared); 8,9 apart (380); 0,14 apart (392, exactly
    # half: kept); far apart
    second = [[0, 0], [8, 8], [8, 9], [0, 14], [30, 30]]
    positions = torch.tensor([[[[0, 0], s] for s in second]])
    assert readable_digits(positions)[0].tolist() == [[False] * 2, [False] * 2, [True] * 2, [True] * 2, [True] * 2]

    class Says3(torch.nn.Module):  # a classifier that reads every window as a 3
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float() + self.p

    frames = torch.zeros(1, 5, 1, 64, 64)
    accuracy = digit_accuracy(Says3(), frames, positions, torch.tensor([[3, 5]]))
    assert torch.isnan(accuracy[0, :2]).all() and accuracy[0, 2:].tolist() == [0.5, 0.5, 0.5]
    # three digits: the two on top of each other are left out, the third is scored alone
    three = torch.tensor([[[[0, 0], [2, 2], [36, 36]]]])
    assert digit_accuracy(Says3(), frames[:, :1], three, torch.tensor([[5, 5, 3]])).tolist() == [[1.0]]
    assert digit_accuracy(Says3(), frames[:, :1], three, torch.tensor([[3, 3, 5]])).tolist() == [[0.0]]


def test_bad_layouts_and_weights_are_refused(tmp_path):
    frames = torch.zeros(1, 2, 1, 64, 64)
    model = DigitClassifier()
    with pytest.raises(ValueError, match="inside the 64x64 frames"):
        digit_accuracy(model, frames, torch.full((1, 2, 1, 2), 40), torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"positions must be \(B, F, D, 2\)"):
        digit_accuracy(model, frames, torch.zeros(1, 3, 1, 2), torch.zeros(1, 1))
    with pytest.raises(FileNotFoundError, match="train_digit_classifier"):
        load_digit_classifier(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_digit_classifier(tmp_path / "bad.safetensors")


def test_frames_without_a_readable_digit_are_left_out_of_the_averages():
    from mcvd_diffusers.metrics import DIGIT_ACC, aggregate

    nan = float("nan")
    values = torch.tensor([[[1.0, nan, 0.0], [1.0, nan, 1.0]],  # clip 0: two samples, frame 2 unscored
                           [[nan, nan, nan], [nan, nan, nan]],  # clip 1: no frame scored
                           [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])
    stats = aggregate({DIGIT_ACC: values})[DIGIT_ACC]
    assert stats["per_clip_mean_of_k"] == [0.75, None, pytest.approx(1 / 6)]
    assert stats["per_clip_best_of_k"] == [1.0, None, pytest.approx(1 / 3)]
    assert stats["mean_of_k"]["mean"] == pytest.approx((0.75 + 1 / 6) / 2)
    assert stats["per_frame"] == [0.5, 0.0, 0.5]
    json.dumps(stats, allow_nan=False)  # JSON without NaN
    assert aggregate({DIGIT_ACC: torch.full((2, 1, 3), nan)})[DIGIT_ACC]["mean_of_k"] == {"mean": None, "ci95": None}


def test_validation_clips_record_where_their_digits_are_for_digit_identity_on_validation():
    # bench_sampler_steps.py scores digit identity on the validation clips that choose samplers and recipes
    config = TrainConfig.from_dict({"preset": "tiny", "num_past_frames": 5, "num_current_frames": 2,
                                    "val_clips": 32, "mnist_root": "bundled"})
    validation = ValidationSet(load_mnist("val", root="bundled"), build_unet(config), config)
    predicted = slice(5, 5 + PREDICTED_FRAMES)
    digits = DigitIdentity(validation.positions[:, predicted], validation.labels)
    truth = validation.clips[:, predicted]
    assert validation.positions.shape == (32, validation.clips.shape[1], 2, 2) and validation.labels.shape == (32, 2)
    assert digits(truth, slice(None)).nanmean() > 0.9  # the frames hold those digits at those places
    assert digits(torch.zeros_like(truth), slice(None)).nanmean() < 0.3
    shifted = DigitIdentity(validation.positions[:, predicted], (validation.labels + 1) % 10)
    assert shifted(truth, slice(None)).nanmean() < 0.1
