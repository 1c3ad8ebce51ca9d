import gzip
import urllib.error

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

import dataset
from conftest import make_archive, synthetic_data, write_image_tree
from dataset import (CIFAR10_CLASSES, DatasetError, TensorLoader, augment_batch, channel_stats,
                     load_cifar10, stratified_subset)


def check_loaded(data, pixels):
    assert data.train_x.shape == (30, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (20, 3, 32, 32)
    assert data.train_y.tolist() == [c for c in range(10) for _ in range(3)]
    assert data.classes == CIFAR10_CLASSES
    # First training image of class "cat" (label 3), pixel-exact in CHW order.
    assert np.array_equal(data.train_x[9].permute(1, 2, 0).numpy(), pixels[("train", "cat", 0)])
    assert np.allclose(data.mean, channel_stats(data.train_x)[0])


def test_loads_a_class_folder_tree(image_tree, cache_dir):
    root, pixels = image_tree
    check_loaded(load_cifar10(root, cache_dir=cache_dir, verbose=False), pixels)


def test_loads_a_tar_gz_archive_and_records_its_sha256(image_tree, cache_dir, tmp_path):
    root, pixels = image_tree
    archive = make_archive(root, tmp_path / "tiny.tar.gz")
    data = load_cifar10(archive, cache_dir=cache_dir, verbose=False)
    check_loaded(data, pixels)
    assert data.sha256 == dataset._sha256_file(archive)


def test_second_load_comes_from_the_cache(image_tree, cache_dir, monkeypatch):
    root, _ = image_tree
    first = load_cifar10(root, cache_dir=cache_dir, verbose=False)
    monkeypatch.setattr(dataset, "_decode_splits", lambda *a: pytest.fail("decoded again"))
    again = load_cifar10(root, cache_dir=cache_dir, verbose=False)
    assert torch.equal(first.train_x, again.train_x)


def test_cache_is_keyed_by_the_source(tmp_path, cache_dir):
    write_image_tree(tmp_path / "a", seed=1)
    write_image_tree(tmp_path / "b", seed=2)
    a = load_cifar10(make_archive(tmp_path / "a", tmp_path / "a.tar.gz"), cache_dir=cache_dir,
                     verbose=False)
    b = load_cifar10(make_archive(tmp_path / "b", tmp_path / "b.tar.gz"), cache_dir=cache_dir,
                     verbose=False)
    assert not torch.equal(a.train_x, b.train_x)
    assert len(list(cache_dir.iterdir())) == 2


def test_environment_variable_is_the_default_source(image_tree, cache_dir, monkeypatch):
    root, pixels = image_tree
    monkeypatch.setenv("CIFAR10_DATA", str(root))
    check_loaded(load_cifar10(cache_dir=cache_dir, verbose=False), pixels)


# ------------------------------------------------------------------------------ bad input

def test_missing_path(tmp_path, cache_dir):
    with pytest.raises(DatasetError, match=r"nowhere does not exist: point CIFAR10_DATA"):
        load_cifar10(tmp_path / "nowhere", cache_dir=cache_dir)


def test_no_data_and_no_internet(tmp_path, cache_dir, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.delenv("CIFAR10_DATA", raising=False)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DatasetError, match=r"download failed.*Without internet, set CIFAR10_DATA"):
        load_cifar10(None, cache_dir=cache_dir, download_root=tmp_path / "dl")


def test_truncated_archive(image_tree, tmp_path, cache_dir):
    archive = make_archive(image_tree[0], tmp_path / "tiny.tar.gz")
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match=r"tiny.tar.gz is corrupted or truncated"):
        load_cifar10(archive, cache_dir=cache_dir)


def test_garbage_archive(tmp_path, cache_dir):
    archive = tmp_path / "junk.tar.gz"
    archive.write_bytes(gzip.compress(b"not a tar file" * 100))
    with pytest.raises(DatasetError, match=r"junk.tar.gz is corrupted or truncated"):
        load_cifar10(archive, cache_dir=cache_dir)


def test_missing_class_folder(image_tree, cache_dir):
    root, _ = image_tree
    for f in (root / "test" / "frog").iterdir():
        f.unlink()
    (root / "test" / "frog").rmdir()
    with pytest.raises(DatasetError, match=r"test: class folders must be exactly.*missing \['frog'\]"):
        load_cifar10(root, cache_dir=cache_dir)


def test_extra_class_folder(image_tree, cache_dir):
    root, _ = image_tree
    (root / "train" / "unicorn").mkdir()
    with pytest.raises(DatasetError, match=r"unexpected \['unicorn'\]"):
        load_cifar10(root, cache_dir=cache_dir)


def test_empty_class_folder_in_an_archive(image_tree, tmp_path, cache_dir):
    root, _ = image_tree
    for f in (root / "train" / "ship").iterdir():
        f.unlink()
    archive = make_archive(root, tmp_path / "tiny.tar.gz")
    with pytest.raises(DatasetError, match=r"class folder .*train/ship has no images"):
        load_cifar10(archive, cache_dir=cache_dir)


def test_image_of_the_wrong_size(image_tree, cache_dir):
    root, _ = image_tree
    Image.new("RGB", (64, 48)).save(root / "train" / "dog" / "0001.png")
    with pytest.raises(DatasetError, match=r"dog/0001.png is 64x48, CIFAR-10 images are 32x32"):
        load_cifar10(root, cache_dir=cache_dir)


def test_undecodable_image(image_tree, cache_dir):
    root, _ = image_tree
    (root / "test" / "cat" / "0000.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match=r"cannot decode image .*cat/0000.png"):
        load_cifar10(root, cache_dir=cache_dir)


def test_no_split_folder(image_tree, cache_dir):
    root, _ = image_tree
    (root / "test").rename(root / "val")
    with pytest.raises(DatasetError, match=r"has no test/ folder"):
        load_cifar10(root, cache_dir=cache_dir)


# --------------------------------------------------------------------- subsets, augmentation

def test_stratified_subset_takes_n_of_every_class():
    y = torch.arange(10).repeat(7)
    x = torch.arange(70)
    sub_x, sub_y = stratified_subset(x, y, 3, seed=1)
    assert torch.bincount(sub_y).tolist() == [3] * 10
    assert torch.equal(y[sub_x], sub_y)
    with pytest.raises(DatasetError, match="only 7 exist"):
        stratified_subset(x, y, 8)


def test_augmentation_keeps_shape_and_dtype():
    x = torch.randn(16, 3, 32, 32)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype


def test_flip_mirrors_some_images_and_keeps_the_others():
    x = torch.randn(64, 3, 32, 32)
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=0, flip=True)
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.randn(32, 3, 32, 32)
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=4, flip=False)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    offsets = []
    for o, p in zip(out, padded):
        match = [(dy, dx) for dy in range(9) for dx in range(9)
                 if torch.equal(o, p[:, dy:dy + 32, dx:dx + 32])]
        assert match, "output is not a 32x32 window of the padded image"
        offsets.append(match[0])
    assert len(set(offsets)) > 5


def test_training_loader_is_seeded_and_drops_the_ragged_tail():
    x = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(50) % 10
    make = lambda: TensorLoader(x, y, (0.5,) * 3, (0.25,) * 3, 16, train=True, seed=3)
    a, b = list(make()), list(make())
    assert len(a) == 3 and all(len(yb) == 16 for _, yb in a)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    tiny = TensorLoader(x[:10], y[:10], (0.5,) * 3, (0.25,) * 3, 16, train=True)
    assert [len(yb) for _, yb in tiny] == [10]  # smaller than a batch: one short batch, not none
    test = TensorLoader(x, y, (0.5,) * 3, (0.25,) * 3, 16, train=False)
    assert torch.equal(torch.cat([yb for _, yb in test]), y)
    first = next(iter(test))[0]
    assert torch.allclose(first, (x[:16].float() / 255 - 0.5) / 0.25)


def test_grayscale_images_are_converted_with_one_warning_naming_count_and_path(image_tree,
                                                                             cache_dir):
    root, pixels = image_tree
    gray = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 256
    for i in (0, 1):
        Image.fromarray(gray.astype(np.uint8), mode="L").save(root / "train" / "cat" / f"{i:04d}.png")
    with pytest.warns(dataset.DatasetWarning) as caught:
        data = load_cifar10(root, cache_dir=cache_dir, verbose=False)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "2 image(s)" in message and "cat/0000.png" in message and "mode L" in message
    cat = data.train_x[9]  # the first training image of class "cat", now RGB
    assert cat.shape == (3, 32, 32) and torch.equal(cat[0], cat[1]) and torch.equal(cat[0], cat[2])
    assert torch.equal(cat[0], torch.from_numpy(gray.astype(np.uint8)))


def test_validation_split_holds_out_a_fixed_stratified_set_never_trained_on():
    data = synthetic_data(per_class=20, test_per_class=5)
    split = data.validation_split(per_class=4)
    assert len(split.test_y) == 40 and len(split.train_y) == 160
    assert torch.bincount(split.test_y).tolist() == [4] * 10
    # Held-out images are training images, and none of them is still in the training part.
    train_rows = {tuple(x.flatten().tolist()) for x in split.train_x}
    held_rows = [tuple(x.flatten().tolist()) for x in split.test_x]
    all_train = {tuple(x.flatten().tolist()) for x in data.train_x}
    assert all(r in all_train and r not in train_rows for r in held_rows)
    # Fixed: the same split every time, whatever the global RNG state (a run's seed).
    torch.manual_seed(123)
    assert torch.equal(data.validation_split(per_class=4).test_x, split.test_x)
    # Normalization statistics come from the images that train, not the held-out ones.
    assert np.allclose(split.mean, channel_stats(split.train_x)[0])
    assert "validation split (4/class" in split.source
    with pytest.raises(DatasetError, match="cannot hold out 20 images of class 0"):
        data.validation_split(per_class=20)
