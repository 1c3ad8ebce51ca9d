"""CIFAR-10 as uint8 tensors, decoded once and cached; batches augmented on the training device.

Sources, chosen by `load_cifar10(source)` or, when source is None, the CIFAR10_DATA variable:
  * a .tar.gz / .tgz / .tar archive in class-folder layout (train/<class>/*, test/<class>/*),
    e.g. the offline JPEG copy ../shared/data/cifar10-jpeg.tar.gz;
  * a folder in that layout (what torchvision.datasets.ImageFolder reads);
  * a folder holding torchvision's `cifar-10-batches-py`;
  * nothing set: torchvision downloads the official files into ./data (needs internet, e.g. Colab).
"""

import hashlib
import io
import os
import tarfile
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

# Alphabetical, which is also the official CIFAR-10 label order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
DATA_ENV_VAR = "CIFAR10_DATA"
CACHE_ENV_VAR = "S8_CACHE_DIR"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SPLITS = ("train", "test")
EXPECTED_PER_CLASS = {"train": 5000, "test": 1000}  # the full CIFAR-10
VALIDATION_SEED = 2026  # fixed: every tuning run holds out the same validation images
CACHE_VERSION = 1  # bump when the cache layout changes, so old caches are rebuilt


class DatasetError(RuntimeError):
    """A data problem the user has to fix; the message says where and how."""


class DatasetWarning(UserWarning):
    """Data that was accepted but changed on the way in (e.g. grayscale images made RGB)."""


@dataclass
class CIFAR10Data:
    train_x: torch.Tensor   # uint8 (N, 3, 32, 32)
    train_y: torch.Tensor   # int64 (N,)
    test_x: torch.Tensor    # uint8 (M, 3, 32, 32)
    test_y: torch.Tensor    # int64 (M,)
    classes: tuple
    source: str             # what was read, for results files
    sha256: str             # of the archive / of the decoded content for folders
    mean: tuple             # per-channel mean of the training images, in [0, 1]
    std: tuple              # per-channel std of the training images, in [0, 1]

    def subset(self, train_per_class=None, test_per_class=None, seed=0):
        """A stratified subset (N images of every class) that keeps the full set's statistics."""
        train = stratified_subset(self.train_x, self.train_y, train_per_class, seed)
        test = stratified_subset(self.test_x, self.test_y, test_per_class, seed)
        return replace(self, train_x=train[0], train_y=train[1], test_x=test[0], test_y=test[1])

    def validation_split(self, per_class=500, seed=VALIDATION_SEED):
        """Hold out `per_class` training images of every class as a validation set.

        Returns data whose train_* are the remaining training images and whose test_* are the
        held-out ones, so that settings are chosen without ever looking at the test set. The
        split is fixed by `seed`, independent of any run's seed; mean/std are recomputed from
        the remaining training images only."""
        counts = torch.bincount(self.train_y)
        for label, count in enumerate(counts.tolist()):
            if count <= per_class:  # something must be left to train on
                raise DatasetError(f"cannot hold out {per_class} images of class {label}: only "
                                   f"{count} exist")
        held = torch.zeros(len(self.train_y), dtype=torch.bool)
        held[stratified_indices(self.train_y, per_class, seed)] = True
        mean, std = channel_stats(self.train_x[~held])
        return replace(self, train_x=self.train_x[~held], train_y=self.train_y[~held],
                       test_x=self.train_x[held], test_y=self.train_y[held], mean=mean, std=std,
                       source=f"{self.source}, validation split ({per_class}/class, seed {seed})")

    def describe(self):
        mean = ", ".join(f"{m:.4f}" for m in self.mean)
        std = ", ".join(f"{s:.4f}" for s in self.std)
        return (f"CIFAR-10 from {self.source}: {len(self.train_y)} train / {len(self.test_y)} test "
                f"images; train mean ({mean}), std ({std})")


def stratified_indices(y, per_class, seed=0):
    """Sorted indices of the first `per_class` images of each class after a seeded shuffle."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    keep = []
    for label in torch.unique(y).tolist():
        members = order[y[order] == label]
        if len(members) < per_class:
            raise DatasetError(f"asked for {per_class} images of class {label}, "
                               f"only {len(members)} exist")
        keep.append(members[:per_class])
    return torch.cat(keep).sort().values


def stratified_subset(x, y, per_class, seed=0):
    """The first `per_class` images of each class after a seeded shuffle; None keeps everything."""
    if per_class is None:
        return x, y
    keep = stratified_indices(y, per_class, seed)
    return x[keep], y[keep]


def channel_stats(images):
    """Per-channel mean and std in [0, 1] of uint8 (N, 3, H, W) images, in float64."""
    x = images.to(torch.float64).div_(255)
    return (tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist()))


# --------------------------------------------------------------------------------------- loading

def default_cache_dir():
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "s8_normalization")


def load_cifar10(source=None, cache_dir=None, download_root="data", verbose=True):
    """Load CIFAR-10 from `source` (see module docstring), through a cache keyed by the source."""
    if source is None and DATA_ENV_VAR in os.environ and not os.environ[DATA_ENV_VAR].strip():
        raise DatasetError(f"{DATA_ENV_VAR} is set but empty: point it at a CIFAR-10 archive or "
                           f"folder, or unset it to download the official files")
    source = source or os.environ.get(DATA_ENV_VAR) or None
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if source is None:
        reader, key, description = _torchvision_download(download_root)
    else:
        reader, key, description = _local_reader(Path(source).expanduser())

    cache_file = cache_dir / f"cifar10-v{CACHE_VERSION}-{key[:24]}.npz"
    arrays = _read_cache(cache_file)
    if arrays is None:
        if verbose:
            print(f"Decoding {description} once; cached at {cache_file}")
        arrays = reader()
        _write_cache(cache_file, arrays)
    data = CIFAR10Data(
        train_x=torch.from_numpy(arrays["train_x"]), train_y=torch.from_numpy(arrays["train_y"]),
        test_x=torch.from_numpy(arrays["test_x"]), test_y=torch.from_numpy(arrays["test_y"]),
        classes=CIFAR10_CLASSES, source=description, sha256=str(arrays["sha256"]),
        mean=tuple(arrays["mean"].tolist()), std=tuple(arrays["std"].tolist()),
    )
    warn_about_class_counts(data)
    if verbose:
        print(data.describe())
    return data


def warn_about_class_counts(data):
    """One warning naming the classes whose image count is off: below the split's largest count
    (CIFAR-10 is balanced, so a truncated copy shows here), or, for a source that calls itself
    CIFAR-10, different from the full set's EXPECTED_PER_CLASS."""
    claims_cifar = "cifar" in data.source.lower()
    odd = []
    for split, labels in (("train", data.train_y), ("test", data.test_y)):
        counts = torch.bincount(labels, minlength=len(data.classes)).tolist()
        expected = EXPECTED_PER_CLASS[split] if claims_cifar else max(counts)
        odd += [f"{split}/{data.classes[c]}: {n} (expected {expected})"
                for c, n in enumerate(counts) if n != expected]
    if odd:
        warnings.warn(f"{data.source} does not hold the images per class a complete CIFAR-10 "
                      f"does: {', '.join(odd)}; a truncated or partial copy? Check the data "
                      f"before trusting results", DatasetWarning, stacklevel=3)


def _local_reader(path):
    if not path.exists():
        raise DatasetError(
            f"CIFAR-10 source {path} does not exist: point {DATA_ENV_VAR} (or --data) at a "
            f"cifar10 .tar.gz archive or a folder with train/<class>/ and test/<class>/ images"
        )
    if path.is_file():
        if not path.name.endswith(ARCHIVE_SUFFIXES):
            raise DatasetError(f"{path} is a file but not a .tar.gz/.tgz/.tar archive")
        digest = _sha256_file(path)
        return (lambda: _decode_archive(path, digest)), "archive-" + digest, f"{path.name} (archive)"
    batches = path / "cifar-10-batches-py"
    if batches.is_dir() or path.name == "cifar-10-batches-py":
        root = path if batches.is_dir() else path.parent
        key = _listing_fingerprint(root / "cifar-10-batches-py")
        return (lambda: _decode_torchvision(root, download=False)), "torchvision-" + key, \
            f"{root} (torchvision CIFAR10 files)"
    return (lambda: _decode_folder(path)), "folder-" + _listing_fingerprint(path), f"{path} (folder)"


def _torchvision_download(root):
    root = Path(root)
    batches = root / "cifar-10-batches-py"
    key = _listing_fingerprint(batches) if batches.is_dir() else "pending"
    if key == "pending":
        # Download now so the cache key can come from the downloaded files.
        _decode_torchvision(root, download=True, decode=False)
        key = _listing_fingerprint(batches)
    return (lambda: _decode_torchvision(root, download=False)), "torchvision-" + key, \
        "official CIFAR-10 (torchvision download)"


def _decode_torchvision(root, download, decode=True):
    try:
        from torchvision.datasets import CIFAR10  # only here: the archive path needs torch alone
        splits = {s: CIFAR10(str(root), train=(s == "train"), download=download) for s in SPLITS}
    except Exception as err:  # URLError, checksum RuntimeError, ...
        raise DatasetError(
            f"no CIFAR-10 data in {root} and the download failed ({err}). Without internet, set "
            f"{DATA_ENV_VAR}=/path/to/cifar10-jpeg.tar.gz (or a folder with train/<class>/ and "
            f"test/<class>/ images), or pass --data"
        ) from None
    if not decode:
        return None
    out = {}
    for split, ds in splits.items():
        out[f"{split}_x"] = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))
        out[f"{split}_y"] = np.asarray(ds.targets, dtype=np.int64)
    digest = hashlib.sha256()
    for name in sorted(os.listdir(Path(root) / "cifar-10-batches-py")):
        digest.update((Path(root) / "cifar-10-batches-py" / name).read_bytes())
    return _finish(out, digest.hexdigest())


def _decode_archive(path, digest):
    files = {split: {} for split in SPLITS}  # split -> class -> [(name, bytes)]
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                where = _split_class(parts, member.isdir())
                if where is None:
                    continue
                split, cls = where
                images = files[split].setdefault(cls, [])
                if member.isfile() and parts[-1].lower().endswith(IMAGE_SUFFIXES):
                    images.append((member.name, tar.extractfile(member).read()))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DatasetError(
            f"{path} is corrupted or truncated ({type(err).__name__}: {err}); copy or download "
            f"it again (expected sha256 is listed next to the archive, if any)"
        ) from None
    return _finish(_decode_splits(files, str(path)), digest)


def _split_class(parts, is_dir):
    """(split, class) of an archive member at .../train/<class>[/file], else None."""
    for i, part in enumerate(parts):
        if part in SPLITS and len(parts) > i + 1:
            if len(parts) == i + 2 and is_dir or len(parts) == i + 3:
                return part, parts[i + 1]
    return None


def _decode_folder(root):
    files = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetError(f"{root} has no {split}/ folder: expected {root}/{split}/<class>/ "
                               f"images for each of the 10 CIFAR-10 classes")
        files[split] = {
            d.name: [(str(p), p.read_bytes()) for p in sorted(d.iterdir())
                     if p.suffix.lower() in IMAGE_SUFFIXES]
            for d in split_dir.iterdir() if d.is_dir()
        }
    digest = hashlib.sha256()
    for split in SPLITS:
        for cls in sorted(files[split]):
            for name, blob in files[split][cls]:
                digest.update(f"{split}/{cls}/{Path(name).name}".encode())
                digest.update(blob)
    return _finish(_decode_splits(files, str(root)), digest.hexdigest())


def _decode_splits(files, where):
    out = {}
    converted = []  # (name, mode) of every image that was not RGB
    for split in SPLITS:
        found = files.get(split, {})
        if not found:
            raise DatasetError(f"{where} has no {split}/<class>/ images: expected the class-folder "
                               f"layout train/<class>/*.jpg and test/<class>/*.jpg")
        missing = sorted(set(CIFAR10_CLASSES) - set(found))
        extra = sorted(set(found) - set(CIFAR10_CLASSES))
        if missing or extra:
            raise DatasetError(
                f"{where}/{split}: class folders must be exactly the 10 CIFAR-10 classes; "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unexpected {extra} (remove or rename them)" if extra else "")
            )
        xs, ys = [], []
        for label, cls in enumerate(CIFAR10_CLASSES):
            images = sorted(found[cls])
            if not images:
                raise DatasetError(f"class folder {where}/{split}/{cls} has no images")
            for name, blob in images:
                try:
                    with Image.open(io.BytesIO(blob)) as im:
                        if im.mode != "RGB":
                            converted.append((name, im.mode))
                        im = im.convert("RGB")
                except (UnidentifiedImageError, OSError, ValueError) as err:
                    raise DatasetError(f"cannot decode image {name} ({err}): replace or remove "
                                       f"it, or re-create the dataset copy") from None
                if im.size != (32, 32):
                    raise DatasetError(f"image {name} is {im.size[0]}x{im.size[1]}, CIFAR-10 "
                                       f"images are 32x32: resize it or use the right dataset")
                xs.append(np.asarray(im, dtype=np.uint8))
                ys.append(label)
        out[f"{split}_x"] = np.ascontiguousarray(np.stack(xs).transpose(0, 3, 1, 2))
        out[f"{split}_y"] = np.asarray(ys, dtype=np.int64)
    if converted:
        # Accepted, since a gray image is still a valid input once its channel is repeated, but
        # said once and loudly: CIFAR-10 has no such images, so this may be the wrong dataset.
        name, mode = converted[0]
        warnings.warn(f"{len(converted)} image(s) in {where} are not RGB and were converted to "
                      f"RGB (first: {name}, mode {mode}); CIFAR-10's images are all RGB, so check "
                      f"that this is the intended dataset", DatasetWarning, stacklevel=2)
    return out


def _finish(arrays, digest):
    mean, std = channel_stats(torch.from_numpy(arrays["train_x"]))
    arrays.update(sha256=np.array(digest), mean=np.array(mean), std=np.array(std))
    return arrays


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _listing_fingerprint(root):
    """Cheap cache key of a folder: every file's relative path, size and modification time."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_cache(cache_file):
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zlib.error, KeyError):
        return None  # absent or damaged: decode again and overwrite


def _write_cache(cache_file, arrays):
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, cache_file)


# ---------------------------------------------------------------------------------- batching

def augment_batch(x, generator, pad=4, flip=True, mirror=None):
    """Random crop with `pad` reflect padding and random horizontal flip, one draw per image
    (`mirror`: which images to flip, instead of drawing it).

    x: float (N, C, H, W) on any device; `generator` lives on the same device.
    """
    n, _, h, w = x.shape
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")   # (N, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N,1,H,1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N,1,1,W)
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]                                     # (N, C, H, W)
    if flip:
        if mirror is None:
            mirror = torch.rand(n, device=x.device, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


class TensorLoader:
    """Batches of (normalized images, labels) from uint8 tensors kept on `device`.

    Training loaders shuffle and augment with their own seeded generator, whose state
    (`state_dict`) is all a resumed run needs to reproduce the same batches.
    """

    def __init__(self, images, labels, mean, std, batch_size, train, device="cpu", seed=0,
                 pad=4, flip=True, channels_last=True, alternate_flip=False):
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.mean = torch.tensor(mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self.batch_size, self.train = int(batch_size), bool(train)
        self.pad, self.flip, self.channels_last = pad, flip, channels_last
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.epoch = 0  # epochs begun: alternating flips mirror each image in every other one
        self.flipped_first = None  # alternating flips: which images the first epoch mirrors
        if alternate_flip and flip:
            draw = torch.Generator(device=self.device).manual_seed(seed + 1)
            self.flipped_first = torch.rand(len(self.labels), device=self.device,
                                            generator=draw) < 0.5

    def __len__(self):
        n = len(self.labels)
        if self.train:  # full batches only, but never none: a tiny subset is one short batch
            return max(1, n // self.batch_size)
        return -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        if self.train:
            order = torch.randperm(n, device=self.device, generator=self.generator)
            order = order[: len(self) * self.batch_size]  # drop the ragged tail: steady batch stats
            self.epoch += 1
        else:
            order = torch.arange(n, device=self.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            x = (self.images[idx].float().div_(255) - self.mean) / self.std
            if self.train:
                mirror = None if self.flipped_first is None else \
                    self.flipped_first[idx] ^ (self.epoch % 2 == 0)
                x = augment_batch(x, self.generator, self.pad, self.flip, mirror)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]

    def state_dict(self):
        return {"generator": self.generator.get_state(), "epoch": self.epoch}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.epoch = state.get("epoch", 0)
