import gzip
import hashlib
import shutil
import urllib.error

import numpy as np
import pytest

from mcvd_diffusers.data import mnist
from mcvd_diffusers.data.mnist import MNISTNotFoundError, load_mnist, read_idx


def test_reads_the_shared_mnist_files(mnist_dir):
    train, val, test = (load_mnist(s, root=mnist_dir) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert tuple(train.images.shape[1:]) == (28, 28) and str(train.images.dtype) == "torch.uint8"
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    full = np.concatenate([train.images.numpy(), val.images.numpy()])
    assert abs(full.mean() / 255 - 0.1307) < 1e-4 and abs(full.std() / 255 - 0.3081) < 1e-4
    assert str(mnist_dir) in train.source and "split train" in train.source


def test_gzip_and_plain_idx_give_the_same_array(mnist_dir, tmp_path):
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    np.testing.assert_array_equal(read_idx(plain), read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz"))


def test_environment_variable_points_at_the_folder(mnist_dir, monkeypatch):
    monkeypatch.setenv("MCVD_MNIST_DIR", str(mnist_dir))
    assert len(load_mnist("test")) == 10000


def test_bundled_sample_is_small_and_attributed():
    folder = mnist.bundled_mnist_dir()
    assert sum(f.stat().st_size for f in folder.iterdir()) < 1_000_000
    assert "CC BY-SA 3.0" in (folder / "README.md").read_text()
    train, val, test = (load_mnist(s, root="bundled") for s in ("train", "val", "test"))
    assert len(train) + len(val) == 4000 and len(test) == 500
    assert "bundled" in train.source


def test_truncated_gzip_names_the_file(mnist_dir, tmp_path):
    for f in mnist_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist("test", root=tmp_path)


def test_idx_with_missing_bytes_or_bad_magic_is_rejected(tmp_path):
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(7))
    with pytest.raises(ValueError, match="header promises shape \\(10,\\).*holds 7 bytes"):
        read_idx(short)
    wrong = tmp_path / "wrong-idx1-ubyte"
    wrong.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(wrong)


def test_missing_files_and_no_network_give_instructions(tmp_path, monkeypatch):
    with pytest.raises(MNISTNotFoundError, match="lacks .*MCVD_MNIST_DIR"):
        load_mnist("train", root=tmp_path)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(mnist.urllib.request, "urlopen", offline)
    with pytest.raises(MNISTNotFoundError, match="(?s)Could not download .*no network.*MCVD_MNIST_DIR"):
        load_mnist("train")  # empty cache, no env var: tries every mirror
    with pytest.raises(MNISTNotFoundError, match="download=False"):
        load_mnist("train", download=False)


def _sha256(path):
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_verifies_checksums(mnist_dir, tmp_path):
    mirror = mnist_dir.resolve().as_uri() + "/"
    checksums = {f.name: _sha256(f) for f in sorted(mnist_dir.glob("*.gz"))}
    target = tmp_path / "cache"
    mnist.download_mnist(target, mirrors=("file:///nonexistent/", mirror), checksums=checksums)
    assert len(load_mnist("test", root=target)) == 10000

    tampered = dict(checksums, **{"train-labels-idx1-ubyte.gz": "sha256:" + "0" * 64})
    other = tmp_path / "other"
    with pytest.raises(MNISTNotFoundError, match="(?s)train-labels-idx1-ubyte.gz: checksum mismatch"):
        mnist.download_mnist(other, mirrors=(mirror,), checksums=tampered)
    assert not (other / "train-labels-idx1-ubyte.gz").exists()  # nothing half-verified is left behind
    assert not list(other.glob(".*.part"))


def test_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist("validation", root="bundled")


def test_download_file_verifies_md5_and_refuses_malformed_checksums(mnist_dir, tmp_path, monkeypatch):
    """MD5 goes through torchvision's calculate_md5, SHA-256 (above) through the project's own."""
    source = mnist_dir / "t10k-labels-idx1-ubyte.gz"
    url, md5 = source.resolve().as_uri(), hashlib.md5(source.read_bytes()).hexdigest()
    fetched = mnist.download_file(url, tmp_path / "good" / "labels.gz", "md5:" + md5.upper())  # either hex case
    assert fetched == tmp_path / "good" / "labels.gz" and fetched.read_bytes() == source.read_bytes()
    with pytest.raises(ValueError, match=rf"labels.gz: checksum mismatch \(md5 {md5}, expected 0{{32}}\)"):
        mnist.download_file(url, tmp_path / "bad" / "labels.gz", "md5:" + "0" * 32)
    assert not list((tmp_path / "bad").iterdir())  # neither the file nor its .part

    def no_network(*args, **kwargs):
        raise AssertionError("fetched despite a malformed checksum")

    monkeypatch.setattr(mnist.urllib.request, "urlopen", no_network)
    for malformed in ("sha1:" + "0" * 40, md5, "md5:"):
        with pytest.raises(ValueError, match="ALGORITHM:HEX with ALGORITHM one of \\['md5', 'sha256'\\]"):
            mnist.download_file(url, tmp_path / "never" / "labels.gz", malformed)
        with pytest.raises(ValueError, match="ALGORITHM:HEX"):  # not retried on every mirror as a failed download
            mnist.download_mnist(tmp_path / "never", checksums={"labels.gz": malformed})
    assert not (tmp_path / "never").exists()
