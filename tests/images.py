"""Real image files, good and bad, for tests (a helper module: no tests here).

`write_image_zoo` writes one file per case a crawler meets in the wild and says what
`decode_image` must make of it: "ok" or the expected DecodeError kind.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _noise_rgb(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradient plus noise: realistic enough for JPEG, never a constant image."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 / max(width - 1, 1), ys * 255 / max(height - 1, 1),
                     np.full_like(xs, 128.0)], axis=-1)
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def write_bilevel_png(path: str, width: int, height: int) -> None:
    """A valid all-black 1-bit PNG written row by row: a huge image in a few kB, never in memory."""
    row = b"\x00" + bytes((width + 7) // 8)
    compressor, parts = zlib.compressobj(9), []
    for start in range(0, height, 1024):
        parts.append(compressor.compress(row * min(1024, height - start)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                     + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b""))


def _corrupt_png_bytes(seed: int = 3) -> bytes:
    """A noisy PNG whose IDAT payload has 64 bytes inverted in the middle."""
    buffer = io.BytesIO()
    Image.fromarray(_noise_rgb(64, 64, seed)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8:start - 4])[0]
    middle = start + length // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    return bytes(data)


def _truncated_jpeg_bytes(seed: int = 4) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise_rgb(128, 96, seed)).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) // 2]


def _frames(colors, mode: str = "RGB") -> list[Image.Image]:
    return [Image.new(mode, (40, 30), color) for color in colors]


def _write_good_rgb(directory: str) -> dict[str, str]:
    cases = {"rgb_landscape.jpg": (96, 64), "rgb_portrait.png": (40, 90), "rgb_tiny.jpg": (7, 5),
             "rgb_wide.png": (300, 50), "rgb_square.jpg": (224, 224), "rgb_odd.png": (101, 77)}
    for i, (name, (width, height)) in enumerate(cases.items()):
        Image.fromarray(_noise_rgb(width, height, seed=i)).save(os.path.join(directory, name))
    return {name: "ok" for name in cases}


def _write_modes(directory: str) -> dict[str, str]:
    """Non-RGB modes that must still decode: gray, CMYK, palette+transparency, alpha, 16-bit."""
    path = lambda name: os.path.join(directory, name)  # noqa: E731
    Image.fromarray(_noise_rgb(60, 40, 10)[..., 0]).save(path("gray.jpg"))
    Image.new("CMYK", (50, 40), (255, 0, 0, 0)).save(path("cmyk.jpg"), quality=95)
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 20, 40))
    palette.save(path("palette_transparent.png"), transparency=0)
    Image.new("RGBA", (40, 30), (0, 0, 0, 0)).save(path("rgba_transparent.png"))
    Image.new("LA", (30, 40), (0, 0)).save(path("la_transparent.png"))
    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    Image.fromarray(gradient).save(path("gray16.png"))
    Image.new("1", (33, 21), 1).save(path("bilevel.png"))
    return {name: "ok" for name in ("gray.jpg", "cmyk.jpg", "palette_transparent.png", "rgba_transparent.png",
                                    "la_transparent.png", "gray16.png", "bilevel.png")}


def _write_animated(directory: str) -> dict[str, str]:
    """Animations whose first frame is a known colour (GIF red, APNG green, WebP blue)."""
    gif = _frames([RED, GREEN, BLUE])
    gif[0].save(os.path.join(directory, "animated.gif"), save_all=True, append_images=gif[1:], duration=50, loop=0)
    apng = _frames([GREEN, RED, BLUE])
    apng[0].save(os.path.join(directory, "animated.png"), save_all=True, append_images=apng[1:], duration=50)
    webp = _frames([BLUE, RED, GREEN])
    webp[0].save(os.path.join(directory, "animated.webp"), save_all=True, append_images=webp[1:],
                 duration=50, lossless=True)
    return {"animated.gif": "ok", "animated.png": "ok", "animated.webp": "ok"}


def _write_bad(directory: str) -> dict[str, str]:
    files = {
        "empty.jpg": (b"", "empty"),
        "text.png": (b"<html><body>404 not found</body></html>\n", "not_an_image"),
        "truncated.jpg": (_truncated_jpeg_bytes(), "truncated"),
        "corrupt.png": (_corrupt_png_bytes(), "corrupt"),
    }
    for name, (data, _) in files.items():
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(data)
    return {name: kind for name, (_, kind) in files.items()}


def _write_bombs(directory: str) -> dict[str, str]:
    """Three ways to be too large: PIL's hard error (>2x its limit), PIL's warning, our max_pixels."""
    sizes = {"bomb_400mp.png": (20000, 20000), "bomb_95mp.png": (10000, 9500), "bomb_81mp.png": (9000, 9000)}
    for name, (width, height) in sizes.items():
        write_bilevel_png(os.path.join(directory, name), width, height)
    return {name: "too_large" for name in sizes}


def write_image_zoo(directory) -> dict[str, str]:
    """Write the zoo into `directory`; returns file name -> "ok" or the expected DecodeError kind."""
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    expected = {}
    for writer in (_write_good_rgb, _write_modes, _write_animated, _write_bad, _write_bombs):
        expected.update(writer(directory))
    return expected


def write_rgb_images(directory, n: int, size: int = 48, seed: int = 0) -> list[str]:
    """Write `n` small random RGB images (alternating JPEG and PNG); returns their paths in order."""
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(directory, f"img_{i:04d}.{'jpg' if i % 2 == 0 else 'png'}")
        Image.fromarray(_noise_rgb(size, size, seed=seed * 100_003 + i)).save(path)
        paths.append(path)
    return paths
