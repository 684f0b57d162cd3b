"""Reading photos robustly: any common mode becomes H×W×3 uint8 RGB, and a bad file becomes a
:class:`~imix2mix.errors.SceneError` that names it (never a Pillow stack trace).

Conversions: CMYK and YCbCr through Pillow; palette, L, LA and RGBA images are composited on white
(a transparent background is usually "nothing", and white is what a viewer shows); 16-bit and 32-bit
integer greyscale (``I;16``, ``I``) are scaled to 8 bits by value/257; float (``F``) images are read as
[0, 1].  Pillow itself reduces 16-bit RGB PNGs to 8 bits (high byte) when it opens them.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imix2mix.errors import SceneError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
EXIF_ORIENTATION_TAG = 0x0112
_EXIF_IFD_TAG = 0x8769
_EXIF_FOCAL_LENGTH_35MM_TAG = 0xA405
_EXIF_MAKE_TAG = 0x010F
_EXIF_MODEL_TAG = 0x0110
_FULL_FRAME_DIAGONAL_MM = float(np.hypot(36.0, 24.0))


@dataclass(frozen=True)
class PhotoMetadata:
    """What a photo's EXIF says about the camera (None where it says nothing)."""

    stored_size: tuple[int, int]  # (width, height) of the pixels as stored in the file
    orientation: int  # EXIF orientation 1..8 (1 = as stored)
    camera: str | None  # "Make Model"
    focal_length_35mm: float | None  # 35 mm-equivalent focal length in mm

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(width, height) after the EXIF orientation is applied (orientations 5–8 swap the axes)."""
        width, height = self.stored_size
        return (height, width) if self.orientation in (5, 6, 7, 8) else (width, height)

    def focal_length_pixels(self, width: int, height: int) -> float | None:
        """The EXIF 35 mm-equivalent focal length in pixels of a width×height image (diagonal rule)."""
        if self.focal_length_35mm is None:
            return None
        return self.focal_length_35mm * float(np.hypot(width, height)) / _FULL_FRAME_DIAGONAL_MM


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder: str | Path) -> list[Path]:
    """The photos directly inside ``folder``, sorted by name (hidden files and other types skipped)."""
    folder = Path(folder)
    if not folder.exists():
        raise SceneError(folder, "folder does not exist")
    if not folder.is_dir():
        raise SceneError(folder, "is not a folder")
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _open_checked(path: Path) -> Image.Image:
    """Open and fully decode ``path``; every failure becomes a SceneError naming the file."""
    if not path.exists():
        raise SceneError(path, "image file not found")
    if not path.is_file():
        raise SceneError(path, "is not a file")
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than raising) for some damaged files; a damaged photo is an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except UnidentifiedImageError:
        raise SceneError(path, "not a readable image (unknown or corrupt format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SceneError(path, f"image is too large to read safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise SceneError(path, f"image is truncated or corrupt ({exc})") from None
    if image.width < 1 or image.height < 1:
        raise SceneError(path, "image has no pixels")
    return image


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return _composite_on_white(image)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        # 32-bit "I" images are usually 16-bit data in a wider container; scale anything wider by its range.
        full_scale = 65535.0 if values.size == 0 or values.max() <= 65535 else float(values.max())
        grey = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        grey = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise SceneError(path, f"unsupported image mode {mode!r} ({exc})") from None


def read_image(path: str | Path, *, apply_exif_orientation: bool = True) -> np.ndarray:
    """Read a photo as a read-only H×W×3 uint8 RGB array.

    With ``apply_exif_orientation`` the EXIF orientation tag is applied (the photo as a viewer shows it);
    without it the stored pixels are returned, which is what poses estimated by COLMAP refer to.
    """
    path = Path(path)
    image = _open_checked(path)
    if apply_exif_orientation:
        try:
            image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError) as exc:
            raise SceneError(path, f"cannot apply the EXIF orientation ({exc})") from None
    array = np.array(_to_rgb(image, path), dtype=np.uint8)
    array.setflags(write=False)
    return array


def read_metadata(path: str | Path) -> PhotoMetadata:
    """EXIF facts used for pose estimation and orientation decisions (only the header is read)."""
    path = Path(path)
    if not path.is_file():
        raise SceneError(path, "image file not found")
    try:
        with Image.open(path) as image:
            exif = image.getexif()
            stored_size = image.size
    except UnidentifiedImageError:
        raise SceneError(path, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise SceneError(path, f"image is truncated or corrupt ({exc})") from None
    orientation = exif.get(EXIF_ORIENTATION_TAG, 1)
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1
    make = str(exif.get(_EXIF_MAKE_TAG, "")).strip("\x00 ")
    model = str(exif.get(_EXIF_MODEL_TAG, "")).strip("\x00 ")
    camera = " ".join(part for part in (make, model) if part) or None
    focal_35mm = exif.get_ifd(_EXIF_IFD_TAG).get(_EXIF_FOCAL_LENGTH_35MM_TAG)
    try:
        focal_35mm = float(focal_35mm) if focal_35mm else None
    except (TypeError, ValueError):
        focal_35mm = None
    return PhotoMetadata(stored_size=stored_size, orientation=orientation, camera=camera, focal_length_35mm=focal_35mm)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_no_duplicates(paths: list[Path], *, scene: Path | None = None) -> None:
    """Raise a SceneError naming both files when two photos have identical bytes."""
    seen: dict[str, Path] = {}
    for path in paths:
        digest = file_digest(path)
        if digest in seen:
            raise SceneError(
                scene if scene is not None else path,
                f"'{seen[digest]}' and '{path}' are the same photo (identical bytes); remove one of them",
            )
        seen[digest] = path
