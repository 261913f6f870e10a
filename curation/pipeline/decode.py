"""Turn untrusted image bytes into CLIP-ready pixels, or a reason why not.

Datasets at scale contain empty files, HTML saved as .jpg, truncated downloads, CMYK scans,
16-bit PNGs and decompression bombs. One bad image must never take down a batch, so
`decode_image` returns a `DecodeError` instead of raising; the pipeline records it in failed/.

Pixels match open_clip's eval preprocessing (Resize shortest side, BICUBIC, CenterCrop) bit for
bit on RGB images, so embeddings equal those of `create_model_and_transforms(...)[2]`. The one
opt-in exception is `draft=True` (`source.jpeg_draft`): a JPEG at least 4x the target is decoded
at a reduced DCT scale, never below 2x the target, then resized exactly; measured within a mean
0.16 and at most 6 levels of the exact pixels at 2048 px, for 2.7x less CPU. Decoding
and resizing run on CPU workers as uint8 (4x smaller to ship than float32); `normalize_pixels`
does ToTensor + Normalize next to the model.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

DEFAULT_MAX_PIXELS = 64_000_000
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SUPPORTED_PREPROCESS = {"interpolation": "bicubic", "resize_mode": "shortest"}


@dataclass
class DecodeError:
    """Why one image could not be used: `kind` is a stable label, `message` the detail.

    Kinds: empty, not_an_image, truncated, corrupt, too_large, unsupported (readers add others,
    e.g. missing).
    """

    kind: str
    message: str


def _open(data: bytes, max_pixels: int):
    """Read only the header; refuse bombs before any pixel memory is allocated."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
        raise Image.DecompressionBombError(f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
    return image


def _load(image) -> None:
    """Decode pixels (first frame of animations), with PIL's bomb warning as an error."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image.load()


def _high_bit_to_rgb(image):
    """16/32-bit grayscale to 8 bits by scaling 0..65535 to 0..255 (PIL's convert clips to white)."""
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    scaled = np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB")


def _on_white(image):
    """Composite transparent pixels onto white, as a viewer shows them, instead of black."""
    from PIL import Image

    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb(image):
    """Any PIL mode to 8-bit RGB: alpha on white, palette transparency honoured, 16-bit scaled."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _HIGH_BIT_MODES:
        return _high_bit_to_rgb(image)
    if image.mode == "F":
        raise ValueError("32-bit float images have no defined 0..255 range")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _on_white(image)
    return image.convert("RGB")


def resize_center_crop(image, image_size: int) -> np.ndarray:
    """torchvision Resize(image_size, BICUBIC) + CenterCrop(image_size), as open_clip's eval
    transform, written with PIL alone: decode workers then never import torch (~1.3 GB each).

    Same arithmetic as torchvision on PIL images (long side truncated, no resize when the short
    side already fits, crop offsets rounded). Returns uint8 of shape (image_size, image_size, 3).
    """
    from PIL import Image

    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = image_size, int(image_size * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    if size != (width, height):
        image = image.resize(size, Image.Resampling.BICUBIC)
    left = int(round((size[0] - image_size) / 2.0))
    top = int(round((size[1] - image_size) / 2.0))
    return np.array(image.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)


def _classify_load_error(err: Exception) -> DecodeError:
    text = f"{type(err).__name__}: {err}"
    if "truncated" in str(err).lower():
        return DecodeError("truncated", text)
    if "decoder" in str(err).lower() and "not available" in str(err).lower():
        return DecodeError("unsupported", text)
    return DecodeError("corrupt", text)


def _opened(data: bytes, max_pixels: int):
    """The header-parsed image, or a DecodeError for empty, non-image and oversized input."""
    from PIL import Image, UnidentifiedImageError

    if len(data) == 0:
        return DecodeError("empty", "zero bytes")
    try:
        return _open(data, max_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return DecodeError("too_large", f"{type(e).__name__}: {e}")
    except UnidentifiedImageError:
        return DecodeError("not_an_image", f"no image format recognised; starts with {bytes(data[:16])!r}")
    except Exception as e:  # noqa: BLE001 - malformed headers raise many types (SyntaxError, struct.error ...)
        return DecodeError("corrupt", f"{type(e).__name__}: {e}")


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft_px: int | None = None) -> Image.Image | DecodeError:
    """Untrusted bytes -> an 8-bit RGB PIL image, or a DecodeError; never raises for a bad image.

    Images with more than `max_pixels` pixels (width*height from the header) are refused before
    decoding; PIL's own limit (Image.MAX_IMAGE_PIXELS, ~89M) also applies, since we change no
    global state. `draft_px` lets JPEG decode at a reduced scale no smaller than that size (a
    thumbnail of a 24 MP photo then costs a fraction of a full decode); None decodes exactly.
    """
    from PIL import Image

    image = _opened(data, max_pixels)
    if isinstance(image, DecodeError):
        return image
    try:
        if draft_px:
            image.draft("RGB", (draft_px, draft_px))
        _load(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return DecodeError("too_large", f"{type(e).__name__}: {e}")
    except MemoryError as e:
        return DecodeError("too_large", f"MemoryError: {e}")
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, zlib.error ...
        return _classify_load_error(e)
    try:
        return to_rgb(image)
    except Exception as e:  # noqa: BLE001 - exotic modes (LAB, F) PIL cannot convert
        return DecodeError("unsupported", f"mode {image.mode}: {type(e).__name__}: {e}")


DRAFT_MARGIN = 2  # draft decoding keeps at least this many times the target size before resizing


def decode_image(data: bytes, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft: bool = False) -> np.ndarray | DecodeError:
    """Decode + resize + center-crop one image; never raises for a bad image (see `decode_rgb`).

    Returns uint8 of shape (image_size, image_size, 3), or a DecodeError. `draft`: see the module
    docstring (JPEG only; other formats and smaller JPEGs decode exactly either way).
    """
    rgb = decode_rgb(data, max_pixels, draft_px=DRAFT_MARGIN * image_size if draft else None)
    if isinstance(rgb, DecodeError):
        return rgb
    return resize_center_crop(rgb, image_size)  # outside decode_rgb's guards: a broken install must raise


def normalize_pixels(batch_uint8: np.ndarray, mean, std):
    """ToTensor + Normalize for a batch: uint8 (n, H, W, 3) -> float32 torch tensor (n, 3, H, W).

    Same operations in the same order as torchvision's, so results match open_clip exactly.
    """
    import torch

    writable = np.require(batch_uint8, np.uint8, ["C", "W"])  # Ray hands out read-only batches
    pixels = torch.from_numpy(writable).permute(0, 3, 1, 2).contiguous()
    pixels = pixels.to(dtype=torch.float32).div(255)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return pixels.sub(mean_t).div(std_t)


def _square_size(size, model_name: str) -> int:
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"model {model_name!r}: non-square image_size {tuple(size)} is not supported")
        size = size[0]
    return int(size)


def _check_supported(cfg: dict, model_name: str, pretrained: str) -> None:
    """Refuse tags whose preprocessing decode_image does not reproduce (e.g. SigLIP's squash)."""
    for field, supported in _SUPPORTED_PREPROCESS.items():
        value = cfg.get(field, supported)
        if value != supported:
            raise ValueError(f"model {model_name!r} pretrained {pretrained!r} uses {field}={value!r}; "
                             f"decode_image only implements {field}={supported!r}")


def preprocess_config(model_name: str, pretrained: str | None) -> tuple[int, tuple, tuple]:
    """(image_size, mean, std) for a model and pretrained tag, without building the model.

    Mean/std come from the tag's pretrained config when open_clip knows the tag (a checkpoint
    path or None uses OpenAI's), exactly as `create_model_and_transforms` picks them.
    """
    import open_clip

    from curation.models import register_local_configs

    register_local_configs()
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r}. Available: {open_clip.list_models()}")
    size = _square_size(model_cfg["vision_cfg"]["image_size"], model_name)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    _check_supported(tag_cfg, model_name, pretrained)
    mean = tuple(tag_cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(tag_cfg.get("std") or open_clip.OPENAI_DATASET_STD)
    return size, mean, std
