"""Photo reading: every mode becomes H×W×3 uint8 RGB, EXIF orientation, clear errors for bad files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imix2mix.errors import SceneError
from imix2mix.images import check_no_duplicates, list_images, read_image, read_metadata

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8)


def png_16bit(values: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): grey if 2-D, RGB if H×W×3."""
    height, width = values.shape[:2]
    colour_type = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_rgb_png_round_trip_is_exact_and_read_only(tmp_path: Path) -> None:
    Image.fromarray(RGB).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.dtype == np.uint8 and image.shape == (12, 16, 3)
    np.testing.assert_array_equal(image, RGB)
    assert not image.flags.writeable


def test_cmyk_is_converted(tmp_path: Path) -> None:
    # Pillow's RGB→CMYK is c = 255 − r, … with k = 0, so CMYK→RGB gives the colours back exactly.
    Image.fromarray(RGB).convert("CMYK").save(tmp_path / "cmyk.tiff")
    assert Image.open(tmp_path / "cmyk.tiff").mode == "CMYK"
    np.testing.assert_array_equal(read_image(tmp_path / "cmyk.tiff"), RGB)


def test_palette_image_keeps_its_colours(tmp_path: Path) -> None:
    colours = np.array([[255, 0, 0], [0, 128, 255], [10, 200, 30]], dtype=np.uint8)
    indices = RNG.integers(0, 3, (8, 9))
    palette_image = Image.fromarray(indices.astype(np.uint8), mode="P")
    palette_image.putpalette(colours.ravel().tolist())
    palette_image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), colours[indices])


def test_palette_transparency_becomes_white(tmp_path: Path) -> None:
    palette_image = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    palette_image.putpalette([200, 10, 10, 0, 0, 0])
    palette_image.save(tmp_path / "pt.png", transparency=1)
    np.testing.assert_array_equal(read_image(tmp_path / "pt.png"), [[[200, 10, 10], [255, 255, 255]]])


def test_rgba_and_la_are_composited_on_white(tmp_path: Path) -> None:
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 100, 200, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png").astype(int)
    assert image[0, 0].tolist() == [10, 20, 30]
    assert image[0, 1].tolist() == [255, 255, 255]
    expected = np.array([0, 100, 200]) * 128 / 255 + 255 * (1 - 128 / 255)  # alpha blend over white
    assert np.abs(image[0, 2] - expected).max() <= 1
    la = np.array([[[40, 255], [40, 0]]], dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert read_image(tmp_path / "la.png").tolist() == [[[40, 40, 40], [255, 255, 255]]]


def test_16bit_greyscale_is_scaled_to_8bit(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535], [257, 32768, 65280]], dtype=np.uint16)
    (tmp_path / "grey16.png").write_bytes(png_16bit(values))
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    image = read_image(tmp_path / "grey16.png")
    assert image[..., 0].tolist() == [[0, 100, 255], [1, 128, 254]]
    assert (image[..., 0] == image[..., 2]).all()


def test_16bit_rgb_png_is_scaled_to_8bit(tmp_path: Path) -> None:
    values = RNG.integers(0, 65536, (6, 5, 3)).astype(np.uint16)
    (tmp_path / "rgb16.png").write_bytes(png_16bit(values))
    image = read_image(tmp_path / "rgb16.png").astype(int)
    assert np.abs(image - values / 257.0).max() <= 1.0


def test_32bit_integer_image_is_scaled(tmp_path: Path) -> None:
    values = np.array([[0, 65535, 257 * 3]], dtype=np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "i32.tiff")
    assert read_image(tmp_path / "i32.tiff")[..., 1].tolist() == [[0, 255, 3]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise
    Image.fromarray(RGB).save(tmp_path / "rotated.png", exif=exif)
    np.testing.assert_array_equal(read_image(tmp_path / "rotated.png"), np.rot90(RGB, k=-1))
    np.testing.assert_array_equal(read_image(tmp_path / "rotated.png", apply_exif_orientation=False), RGB)
    metadata = read_metadata(tmp_path / "rotated.png")
    assert metadata.orientation == 6 and metadata.stored_size == (16, 12) and metadata.oriented_size == (12, 16)


def test_exif_camera_and_focal_length(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x010F] = "Acme"
    exif[0x0110] = "Cam 1"
    exif.get_ifd(0x8769)[0xA405] = 26  # 35 mm-equivalent focal length
    Image.fromarray(RGB).save(tmp_path / "exif.jpg", exif=exif)
    metadata = read_metadata(tmp_path / "exif.jpg")
    assert metadata.camera == "Acme Cam 1" and metadata.focal_length_35mm == 26.0
    # 35 mm equivalence is defined on the diagonal: f_px = f35 · diag_px / 43.27 mm.
    assert metadata.focal_length_pixels(4000, 3000) == pytest.approx(26 * 5000 / 43.2666, rel=1e-4)
    plain = tmp_path / "plain.png"
    Image.fromarray(RGB).save(plain)
    assert read_metadata(plain).focal_length_pixels(16, 12) is None and read_metadata(plain).camera is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "not a readable image"),
        (b"this is not an image at all", "not a readable image"),
    ],
    ids=["empty", "text"],
)
def test_unreadable_files(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(SceneError) as caught:
        read_image(path)
    assert caught.value.path == path and reason in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_files(tmp_path: Path, suffix: str) -> None:
    big = np.asarray(Image.fromarray(RGB).resize((320, 240)))
    path = tmp_path / f"cut{suffix}"
    Image.fromarray(big).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SceneError) as caught:
        read_image(path)
    assert str(path) in str(caught.value) and "truncated or corrupt" in str(caught.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(SceneError, match="image file not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(SceneError, match="image file not found"):
        read_metadata(tmp_path / "nope.png")
    with pytest.raises(SceneError, match="folder does not exist"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SceneError, match="is not a folder"):
        list_images(tmp_path / "file.txt")


def test_list_images_skips_other_files_and_sorts(tmp_path: Path) -> None:
    for name in ("b.JPG", "a.png", ".hidden.png", "notes.txt", "c.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.webp"]


def test_duplicate_files_are_named(tmp_path: Path) -> None:
    Image.fromarray(RGB).save(tmp_path / "one.png")
    Image.fromarray(RGB[::-1]).save(tmp_path / "two.png")
    (tmp_path / "three.png").write_bytes((tmp_path / "one.png").read_bytes())
    check_no_duplicates([tmp_path / "one.png", tmp_path / "two.png"])
    with pytest.raises(SceneError) as caught:
        check_no_duplicates([tmp_path / "one.png", tmp_path / "two.png", tmp_path / "three.png"], scene=tmp_path)
    message = str(caught.value)
    assert "one.png" in message and "three.png" in message and "identical bytes" in message
