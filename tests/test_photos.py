"""The `photos` data set (the restoration prior's data): bundled photographs, disjoint held-out strip."""

import pytest
import torch

from ditk.data.photos import Photos, PhotosConfig, crop_windows, shrunk_photos
from ditk.errors import ConfigError


def test_train_and_test_crops_share_no_pixel():
    cfg = PhotosConfig()
    photos = shrunk_photos(cfg.photo_size)
    assert len(photos) == 7 and all(min(p.shape[:2]) == cfg.photo_size for p in photos)
    train = crop_windows(cfg.photo_size, 32, cfg.stride, cfg.test_width, cfg.gap, "train")
    test = crop_windows(cfg.photo_size, 32, cfg.stride, cfg.test_width, cfg.gap, "test")
    for p in range(len(photos)):
        right_of_train = max(left + 32 for q, _, left in train if q == p)
        left_of_test = min(left for q, _, left in test if q == p)
        assert right_of_train + cfg.gap <= left_of_test
    ds = Photos(PhotosConfig(split="test"))
    assert len(ds) == len(test) == 28 and ds.shape == (3, 32, 32)
    x, label = ds[0]
    assert label == -1 and x.min() >= -1 and x.max() <= 1
    assert not ds.hflip  # evaluation crops are never flipped


def test_training_flips_are_deterministic():
    ds = Photos(PhotosConfig(split="train"))
    a = torch.stack([ds[(i, 3)][0] for i in range(20)])
    b = torch.stack([ds[(i, 3)][0] for i in range(20)])
    assert torch.equal(a, b)
    assert any(not torch.equal(ds[(i, 3)][0], ds.images[i]) for i in range(20))  # some are mirrored


def test_bad_settings():
    with pytest.raises(ConfigError, match="data.split"):
        Photos(PhotosConfig(split="val"))
    with pytest.raises(ConfigError, match="image_size"):
        Photos(PhotosConfig(image_size=64, test_width=32))
