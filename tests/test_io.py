"""Image IO: DiT's uint8 conversion, grids, PNG folders, ADM .npz, atomic writes."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import ditk.io as dio
from ditk.errors import ConfigError


def test_to_uint8_is_dits_conversion():
    x = torch.cat([torch.linspace(-1.2, 1.2, 2001), torch.tensor([-1.0, 1.0, 0.0, 1 / 255, -1 / 255])])
    x = x.view(1, 1, 1, -1).repeat(2, 3, 1, 1)  # (N, C, H, W)
    got = dio.to_uint8(x)
    want = torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()
    assert got.dtype == np.uint8 and got.shape == (2, 1, 2006, 3)
    np.testing.assert_array_equal(got, want)
    assert got[0, 0, -5:, 0].tolist() == [0, 255, 128, 128, 127]  # -1 -> 0, 1 -> 255, 0 -> 128


def tiles(n, c, h=4, w=5):
    # image i converts to the constant uint8 value 10 * (i + 1) (aimed at the middle of its bin, so exact)
    vals = torch.tensor([10.0 * (i + 1) + 0.5 for i in range(n)])
    return ((vals - 128.0) / 127.5).view(n, 1, 1, 1).expand(n, c, h, w).contiguous()


def test_grid_layout_and_rgb_png(tmp_path):
    x = tiles(5, 3)
    grid = dio.make_grid(x, nrow=3, padding=1, pad_value=7)
    assert grid.shape == (2 * (4 + 1) + 1, 3 * (5 + 1) + 1, 3)
    for i in range(5):
        r, k = divmod(i, 3)
        y0, x0 = 1 + r * 5, 1 + k * 6
        assert (grid[y0 : y0 + 4, x0 : x0 + 5] == 10 * (i + 1)).all()
    assert (grid[0] == 7).all() and (grid[:, 0] == 7).all() and (grid[6:10, 13:18] == 7).all()  # empty 6th cell
    path = dio.save_grid(x, tmp_path / "grid.png", nrow=3, padding=1, pad_value=7)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        np.testing.assert_array_equal(np.array(im), grid)
    assert dio.make_grid(tiles(9, 3), padding=0).shape == (12, 15, 3)  # default nrow = ceil(sqrt(9)) = 3


def test_gray_grid_with_nearest_upscale(tmp_path):
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = dio.save_grid(x, tmp_path / "digits.png", nrow=2, padding=0, scale=4)
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (64, 32)
        arr = np.array(im)
    u8 = dio.to_uint8(x)[..., 0]
    np.testing.assert_array_equal(arr[:, :32], np.kron(u8[0], np.ones((4, 4), np.uint8)))
    np.testing.assert_array_equal(arr[:, 32:], np.kron(u8[1], np.ones((4, 4), np.uint8)))
    with pytest.raises(ValueError):
        dio.save_grid(torch.zeros(1, 4, 8, 8), tmp_path / "latent.png")  # 4 channels: decode first


def test_save_pngs_names_and_content(tmp_path):
    x = tiles(3, 3)
    paths = dio.save_pngs(x, tmp_path / "out", start_index=998)
    assert [p.name for p in paths] == ["000998.png", "000999.png", "001000.png"]
    assert sorted(os.listdir(tmp_path / "out")) == ["000998.png", "000999.png", "001000.png"]
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            np.testing.assert_array_equal(np.array(im), dio.to_uint8(x)[i])


def test_npz_round_trip_is_adm_layout(tmp_path):
    arr = np.random.RandomState(0).randint(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    path = dio.save_npz(arr, tmp_path / "samples.npz")
    assert sorted(os.listdir(tmp_path)) == ["samples.npz"]
    with np.load(path) as f:
        assert f.files == ["arr_0"]
        np.testing.assert_array_equal(f["arr_0"], arr)
    np.testing.assert_array_equal(dio.load_npz(path), arr)
    x = torch.rand(2, 3, 8, 8) * 2 - 1  # float images are converted with to_uint8
    np.testing.assert_array_equal(dio.load_npz(dio.save_npz(x, tmp_path / "f.npz")), dio.to_uint8(x))
    with pytest.raises(ConfigError):
        dio.load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", images=arr)
    with pytest.raises(ConfigError) as e:
        dio.load_npz(tmp_path / "other.npz")
    assert "arr_0" in str(e.value)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError):
        dio.load_npz(tmp_path / "junk.npz")


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    old = np.zeros((1, 2, 2, 3), np.uint8)
    path = dio.save_npz(old, tmp_path / "s.npz")
    png = dio.save_grid(tiles(1, 3), tmp_path / "g.png")
    png_bytes = png.read_bytes()

    def half_then_fail(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(dio.np, "savez", half_then_fail)
    with pytest.raises(OSError):
        dio.save_npz(np.ones((1, 2, 2, 3), np.uint8), path)
    monkeypatch.undo()
    np.testing.assert_array_equal(dio.load_npz(path), old)

    def png_fail(self, fp, format=None, **kw):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", png_fail)
    with pytest.raises(OSError):
        dio.save_grid(tiles(2, 3), png)
    monkeypatch.undo()
    assert png.read_bytes() == png_bytes
    assert sorted(os.listdir(tmp_path)) == ["g.png", "s.npz"]
