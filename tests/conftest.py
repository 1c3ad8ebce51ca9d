import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import CIFAR10_CLASSES, CIFAR10Data, channel_stats
from model import build_model
from checkpoints import load_checkpoint
from utils import fit

ROOT = Path(__file__).resolve().parents[1]

NORMS = ("batch", "group", "layer")
FULL_NET = {"conv": "full", "widths": (16, 28, 32)}  # recipes v1 and v2: full 3x3 convs
SEPARABLE_NET = {"conv": "separable", "widths": (32, 64, 88)}  # the study's separable blocks
# the same blocks, narrow: for tests of what fp16 does around a step, which CPUs emulate slowly
NARROW_NET = {"widths": (8, 16, 16)}


def interrupt_after_epoch_1(norm, data, config, checkpoint_path):
    """Train until epoch 1 ends, then stop as Ctrl-C would: the run a resume must finish
    exactly as if nothing had happened."""
    def interrupt(epoch, history):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(build_model(norm, seed=0), data, config, "cpu", checkpoint_path=checkpoint_path,
            progress=False, on_epoch_end=interrupt)
    assert load_checkpoint(checkpoint_path)["epoch"] == 1


def write_image_tree(root, per_class=(3, 2), size=32, seed=0):
    """train/<class>/ and test/<class>/ PNGs (lossless, so pixels can be checked exactly)."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for split, count in zip(("train", "test"), per_class):
        for cls in CIFAR10_CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"{i:04d}.png")
                pixels[(split, cls, i)] = arr
    return pixels


def make_archive(tree_root, archive_path, top="cifar10-tiny"):
    with tarfile.open(archive_path, "w:gz") as tar:
        tar.add(tree_root, arcname=top)
    return archive_path


@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "tree"
    pixels = write_image_tree(root)
    return root, pixels


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


def synthetic_data(per_class=20, test_per_class=10, seed=0):
    """A learnable stand-in for CIFAR-10: each class is a colour plus noise."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(40, 216, (10, 3, 1, 1), generator=g)

    def split(n):
        y = torch.arange(10).repeat_interleave(n)
        noise = torch.randint(-40, 41, (len(y), 3, 32, 32), generator=g)
        return (colours[y] + noise).clamp(0, 255).to(torch.uint8), y

    train_x, train_y = split(per_class)
    test_x, test_y = split(test_per_class)
    mean, std = channel_stats(train_x)
    return CIFAR10Data(train_x, train_y, test_x, test_y, CIFAR10_CLASSES, "synthetic",
                       "0" * 64, mean, std)


@pytest.fixture
def tiny_data():
    return synthetic_data()
