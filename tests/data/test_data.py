"""Datasets: registry, CIFAR pickles, image folders (dir / tar / tar.gz), SR pairs, bundled
photos, the device loader, determinism. Checks on ``../shared/data`` skip without it."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynconv.data import (
    DATASETS,
    DatasetError,
    DeviceLoader,
    bicubic_resize,
    build_dataset,
    load_skimage_photo,
    make_lr,
    modcrop,
    sample_generator,
    skimage_photo_names,
)
from dynconv.data.classification import CIFAR10_MEAN, CIFAR10_STD

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}")


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture()
def folder_tree(tmp_path: Path) -> Path:
    """``root/{train,test}/{cat,dog}/*.png`` with 8x8 images (3 per class and split)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for cls in ("dog", "cat"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                (root / split / cls / f"{i:04d}.png").write_bytes(_png_bytes(_random_image(rng, 8, 8)))
    return root


def _tar(root: Path, out: Path, mode: str, prefix: str = "") -> Path:
    with tarfile.open(out, mode) as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=prefix + str(path.relative_to(root)), recursive=False)
    return out


# -- registry, generators -------------------------------------------------------------------
def test_registry_has_the_contract_names() -> None:
    assert {"cifar10", "image_folder", "sr_folder", "skimage_sr", "skimage_photos"} <= set(DATASETS)
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        build_dataset("nope", "train")


def test_sample_generator_is_deterministic_and_distinct() -> None:
    def draw(*key: int) -> torch.Tensor:
        return torch.rand(4, generator=sample_generator(*key))

    torch.testing.assert_close(draw(1, 2, 3), draw(1, 2, 3))
    draws = [draw(*key) for key in [(1, 2, 3), (1, 2, 4), (1, 3, 3), (2, 2, 3), (0, 0, 0)]]
    for i in range(len(draws)):
        for j in range(i):
            assert not torch.equal(draws[i], draws[j])
    with pytest.raises(ValueError, match="epoch"):
        sample_generator(0, -1, 0)


# -- CIFAR-10 pickles -----------------------------------------------------------------------
def _fake_cifar(root: Path, n: int = 6) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    return folder


def test_cifar10_pickles(tmp_path: Path) -> None:
    folder = _fake_cifar(tmp_path)
    train = build_dataset("cifar10", "train", root=tmp_path)  # the parent works too
    test = build_dataset("cifar10", "test", root=folder)
    assert len(train) == 30 and len(test) == 6 and train.augment and not test.augment
    item = test[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].shape == ()
    with open(folder / "test_batch", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    expected = torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32)).float() / 255
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(item["image"], (expected - mean) / std)
    assert item["label"].item() == raw[b"labels"][0]


def test_cifar10_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nowhere.*cifar-10-batches-py"):
        build_dataset("cifar10", "train", root=tmp_path / "nowhere")
    folder = _fake_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3"):
        build_dataset("cifar10", "train", root=folder)
    (folder / "test_batch").unlink()
    with pytest.raises(DatasetError, match="missing CIFAR-10 file .*test_batch"):
        build_dataset("cifar10", "test", root=folder)


# -- image folders --------------------------------------------------------------------------
def test_image_folder_directory(folder_tree: Path) -> None:
    ds = build_dataset("image_folder", "test", root=folder_tree)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and ds.labels == [0, 0, 0, 1, 1, 1]
    images, labels = ds.tensors()
    assert images.shape == (6, 3, 8, 8) and images.dtype == torch.uint8
    expected = torch.from_numpy(np.array(Image.open(folder_tree / "test/dog/0001.png"))).permute(2, 0, 1)
    assert torch.equal(images[4], expected) and labels[4] == 1


@pytest.mark.parametrize("mode,suffix,prefix", [("w:gz", ".tar.gz", ""), ("w", ".tar", "./top/")])
def test_image_folder_archives_match_the_directory(folder_tree: Path, tmp_path: Path, mode: str, suffix: str, prefix: str) -> None:
    archive = _tar(folder_tree, tmp_path / f"imgs{suffix}", mode, prefix)
    from_dir = build_dataset("image_folder", "train", root=folder_tree, augment=False)
    from_tar = build_dataset("image_folder", "train", root=archive, augment=False)
    assert from_tar.classes == from_dir.classes and from_tar.labels == from_dir.labels
    assert torch.equal(from_tar.tensors()[0], from_dir.tensors()[0])


def test_image_folder_split_archive_beside(folder_tree: Path, tmp_path: Path) -> None:
    # ../shared/data/cifar10-jpeg layout: root/{train,test}.tar.gz each holding split/<class>/...
    root = tmp_path / "jpeg"
    root.mkdir()
    _tar(folder_tree, root / "test.tar.gz", "w:gz")
    ds = build_dataset("image_folder", "test", root=root)
    assert len(ds) == 6 and str(ds.where).endswith("test.tar.gz")


def test_image_folder_bad_files(folder_tree: Path) -> None:
    bad = folder_tree / "test" / "cat" / "0009.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match="0009.png"):
        ds = build_dataset("image_folder", "test", root=folder_tree)
        [ds[i] for i in range(len(ds))]
    ds = build_dataset("image_folder", "test", root=folder_tree, on_bad_file="skip")
    assert ds.skipped == 1 and len(ds) == 6
    with pytest.raises(ValueError, match="on_bad_file"):
        build_dataset("image_folder", "test", root=folder_tree, on_bad_file="ignore")


def test_image_folder_size_and_preload(folder_tree: Path) -> None:
    ds = build_dataset("image_folder", "test", root=folder_tree, size=12, preload=True, augment=False)
    images, _ = ds.tensors()
    assert images.shape == (6, 3, 12, 12)
    (folder_tree / "test" / "cat" / "0000.png").unlink()  # preloaded: no longer read from disk
    assert ds[0]["image"].shape == (3, 12, 12)


def test_image_folder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"does not exist.*train/<class>/<image>"):
        build_dataset("image_folder", "train", root=tmp_path / "missing")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        build_dataset("image_folder", "train", root=tmp_path / "empty")


def test_classification_augmentation_is_per_sample_deterministic(folder_tree: Path) -> None:
    ds = build_dataset("image_folder", "train", root=folder_tree, seed=3)
    assert ds.augment
    a = ds[2]["image"]
    torch.testing.assert_close(ds[2]["image"], a)
    epochs = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        epochs.append(ds[2]["image"])
    assert any(not torch.equal(epochs[0], e) for e in epochs[1:])
    ds.set_epoch(0)
    torch.testing.assert_close(ds[2]["image"], a)


# -- device loader --------------------------------------------------------------------------
def _is_crop_flip(out: torch.Tensor, img: torch.Tensor, pad: int) -> bool:
    padded = torch.nn.functional.pad(img, (pad,) * 4)
    h, w = img.shape[-2:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            if torch.equal(out, crop) or torch.equal(out, crop.flip(-1)):
                return True
    return False


def test_device_loader(folder_tree: Path) -> None:
    ds = build_dataset("image_folder", "train", root=folder_tree)
    images, labels = ds.tensors()
    plain = DeviceLoader(ds, 4, "cpu", shuffle=False, augment=None)
    assert len(plain) == 2 and len(DeviceLoader(ds, 4, drop_last=True)) == 1
    batches = list(plain)
    assert batches[0]["image"].shape == (4, 3, 8, 8) and batches[1]["image"].shape == (2, 3, 8, 8)
    torch.testing.assert_close(batches[0]["image"], ds.normalise(images[:4]))
    assert torch.equal(torch.cat([b["label"] for b in batches]), labels)

    loader = DeviceLoader(ds, 3, "cpu", shuffle=True, seed=1, augment="crop_flip", pad=2)
    loader.set_epoch(4)
    first = list(loader)
    loader.set_epoch(4)
    again = list(loader)
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    mean, std = torch.tensor(ds.mean).view(3, 1, 1), torch.tensor(ds.std).view(3, 1, 1)
    seen = []
    for batch in first:
        for image, label in zip(batch["image"], batch["label"]):
            raw = (image * std + mean) * 255
            assert torch.allclose(raw, raw.round(), atol=1e-3)
            raw = raw.round().to(torch.uint8)
            match = [i for i in range(len(ds)) if labels[i] == label and _is_crop_flip(raw, images[i], 2)]
            assert match, "every augmented image is a padded crop (maybe flipped) of a dataset image"
            seen.append(match[0])
    assert sorted(seen) == list(range(len(ds)))  # each image once per epoch
    loader.set_epoch(5)
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, loader))


def test_device_loader_rejects_sr_datasets() -> None:
    with pytest.raises(DatasetError, match="classification"):
        DeviceLoader(build_dataset("skimage_sr", "test", scale=4), 2)


# -- super-resolution -------------------------------------------------------------------------
@pytest.fixture()
def hr_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2)
    folder = tmp_path / "hr"
    folder.mkdir()
    # smooth-ish images so crops are easy to locate uniquely
    for i, (h, w) in enumerate([(50, 61), (64, 48)]):
        Image.fromarray(_random_image(rng, h, w)).save(folder / f"img{i}.png")
    return folder


def test_sr_folder_eval_items_are_whole_modcropped_images(hr_folder: Path) -> None:
    ds = build_dataset("sr_folder", "test", root=hr_folder, scale=3)
    assert len(ds) == 2 and ds.names == ["img0", "img1"]
    item = ds[0]
    assert item["hr"].shape == (3, 48, 60) and item["lr"].shape == (3, 16, 20)
    hr = torch.from_numpy(np.array(Image.open(hr_folder / "img0.png"))).permute(2, 0, 1)
    torch.testing.assert_close(item["hr"], modcrop(hr, 3).float() / 255)
    lr = bicubic_resize(item["hr"][None].double(), 1 / 3)[0]
    torch.testing.assert_close(item["lr"].double(), (lr * 255).round().clamp(0, 255) / 255, atol=1e-6, rtol=0)
    assert item["lr"].dtype == torch.float32 and 0 <= item["lr"].min() and item["lr"].max() <= 1


def _locate(patch: torch.Tensor, image: torch.Tensor) -> list[tuple[int, int]]:
    ph, pw = patch.shape[-2:]
    return [
        (y, x)
        for y in range(image.shape[-2] - ph + 1)
        for x in range(image.shape[-1] - pw + 1)
        if torch.equal(image[:, y : y + ph, x : x + pw], patch)
    ]


def test_sr_patches_are_aligned_and_augmented_consistently(hr_folder: Path) -> None:
    plain = build_dataset("sr_folder", "train", root=hr_folder, scale=2, patch_size=16, augment=False, repeat=3)
    aug = build_dataset("sr_folder", "train", root=hr_folder, scale=2, patch_size=16, augment=True, repeat=3)
    assert len(plain) == 6
    transforms_seen = set()
    for index in range(6):
        lr_full, hr_full = plain.pair(index % 2)
        item = plain[index]
        assert item["lr"].shape == (3, 8, 8) and item["hr"].shape == (3, 16, 16)
        lr_u8, hr_u8 = (item["lr"] * 255).round().to(torch.uint8), (item["hr"] * 255).round().to(torch.uint8)
        (y, x), = _locate(lr_u8, lr_full)
        assert (2 * y, 2 * x) in _locate(hr_u8, hr_full)
        a = aug[index]  # the same crop (drawn first), then one of the 8 flips / rotations
        for k in range(8):
            def t(img: torch.Tensor) -> torch.Tensor:
                img = img.flip(-1) if k & 1 else img
                img = img.flip(-2) if k & 2 else img
                return img.transpose(-1, -2) if k & 4 else img

            if torch.equal(t(item["lr"]), a["lr"]) and torch.equal(t(item["hr"]), a["hr"]):
                transforms_seen.add(k)
                break
        else:
            raise AssertionError("augmented pair is not a flip/rotation of the plain pair")
    assert len(transforms_seen) > 1


def test_sr_errors(hr_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="missing"):
        build_dataset("sr_folder", "train", root=tmp_path / "missing")
    with pytest.raises(DatasetError, match="smaller than patch_size"):
        build_dataset("sr_folder", "train", root=hr_folder, patch_size=96)
    with pytest.raises(ValueError, match="patch_size"):
        build_dataset("sr_folder", "train", root=hr_folder, scale=3, patch_size=16)
    with pytest.raises(ValueError, match="scale"):
        build_dataset("sr_folder", "train", root=hr_folder, scale=5)
    (hr_folder / "zz_bad.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="zz_bad.png"):
        build_dataset("sr_folder", "train", root=hr_folder)
    ds = build_dataset("sr_folder", "train", root=hr_folder, on_bad_file="skip")
    assert ds.skipped == 1 and len(ds) == 2


def test_make_lr_is_quantised_bicubic() -> None:
    hr = torch.randint(0, 256, (3, 12, 16), dtype=torch.uint8)
    lr = make_lr(hr, 4)
    assert lr.dtype == torch.uint8 and lr.shape == (3, 3, 4)


# -- bundled photos ---------------------------------------------------------------------------
def test_skimage_photos_split_and_load() -> None:
    train, test = skimage_photo_names("train"), skimage_photo_names("test")
    assert test == ["astronaut", "coffee"] and not set(train) & set(test)
    assert sorted(train + test) == skimage_photo_names()
    photo = load_skimage_photo("chelsea")
    assert photo.shape == (3, 300, 451) and photo.dtype == torch.float32 and photo.max() <= 1
    with pytest.raises(ValueError, match="unknown bundled photo"):
        load_skimage_photo("lena")


def test_skimage_sr_and_reconstruction_items() -> None:
    sr = build_dataset("skimage_sr", "test", scale=4, patch_size=32, repeat=2)
    assert len(sr) == 4 and sr[1]["hr"].shape == (3, 32, 32) and sr[1]["lr"].shape == (3, 8, 8)
    whole = build_dataset("skimage_sr", "test", scale=2)
    assert whole[0]["hr"].shape == (3, 512, 512) and whole[0]["lr"].shape == (3, 256, 256)
    rec = build_dataset("skimage_photos", "test", size=128)
    assert len(rec) == 16 + 3 * 4 and rec[0]["image"].shape == (3, 128, 128)
    torch.testing.assert_close(rec[0]["image"], load_skimage_photo("astronaut")[:, :128, :128])
    with pytest.raises(ValueError, match="no root"):
        build_dataset("skimage_sr", "train", root="/tmp")


def test_folder_crops_hold_out_whole_photos(tmp_path: Path) -> None:
    """folder_crops: every holdout_every-th photo (by name) is the test split, whole photos
    only; test items are the held-out photos' tiles in order, train items random crops that
    depend on (seed, epoch, index) alone; mean/std set the pixel range; errors name the value."""
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(_random_image(rng, 20 + i, 24)).save(tmp_path / f"p{i}.png")
    train = build_dataset("folder_crops", "train", root=tmp_path, size=8, holdout_every=3, mean=[0.5] * 3)
    test = build_dataset("folder_crops", "test", root=tmp_path, size=8, holdout_every=3, mean=[0.5] * 3)
    assert test.names == ["p2", "p5"] and train.names == ["p0", "p1", "p3", "p4", "p6"]
    photo = torch.from_numpy(np.array(Image.open(tmp_path / "p2.png"))).permute(2, 0, 1).float() / 255.0
    assert len(test) == 2 * 3 + 3 * 3  # 22x24 and 25x24 photos: 2x3 and 3x3 tiles of 8
    torch.testing.assert_close(test[1]["image"], photo[:, 0:8, 8:16] - 0.5)
    assert len(train) == sum((20 + i) // 8 * 3 for i in (0, 1, 3, 4, 6)) and train[0]["image"].shape == (3, 8, 8)
    assert -0.5 <= float(train[3]["image"].min()) and float(train[3]["image"].max()) <= 0.5
    again = build_dataset("folder_crops", "train", root=tmp_path, size=8, holdout_every=3, mean=[0.5] * 3)
    assert torch.equal(again[4]["image"], train[4]["image"])
    train.set_epoch(1)
    assert not torch.equal(again[4]["image"], train[4]["image"])
    with pytest.raises(ValueError, match="split must be 'train' or 'test'.*got 'eval'"):
        build_dataset("folder_crops", "eval", root=tmp_path)
    with pytest.raises(ValueError, match="holdout_every must be an int >= 2.*got 1"):
        build_dataset("folder_crops", "test", root=tmp_path, holdout_every=1)
    with pytest.raises(DatasetError, match=r"p0.png is 20x24, smaller than size=21"):
        build_dataset("folder_crops", "train", root=tmp_path, size=21, holdout_every=3)
    with pytest.warns(UserWarning, match="skipped"):
        skipping = build_dataset("folder_crops", "train", root=tmp_path, size=21, holdout_every=3, on_bad_file="skip")
    assert skipping.names == ["p1", "p3", "p4", "p6"] and skipping.skipped == 1


# -- shared data (manual-check data; skipped where ../shared is absent) ------------------------
@needs_shared
def test_shared_set5_x2_bicubic_matches_published() -> None:
    from dynconv.metrics import psnr_y, ssim_y

    ds = build_dataset("sr_folder", "test", root=SHARED / "sr" / "test" / "Set5", scale=2)
    psnrs, ssims = [], []
    for i in range(len(ds)):
        item = ds[i]
        up = bicubic_resize(item["lr"][None], 2.0)
        psnrs.append(psnr_y(up, item["hr"][None], 2).item())
        ssims.append(ssim_y(up, item["hr"][None], 2).item())
    # published (MATLAB): 33.66 dB / 0.9299; MATLAB's uint8 intermediates move it by ~0.03 dB
    assert abs(np.mean(psnrs) - 33.66) < 0.05
    assert abs(np.mean(ssims) - 0.9299) < 0.002


@needs_shared
def test_shared_cifar10_jpeg_layout() -> None:
    ds = build_dataset("image_folder", "test", root=SHARED / "cifar10-jpeg")
    assert len(ds) == 10000 and len(ds.classes) == 10 and ds.classes[0] == "airplane"
    assert ds[0]["image"].shape == (3, 32, 32)
