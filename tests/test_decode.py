"""decode_image on real good and bad files; pixels identical to open_clip's eval transform."""

import io
import time

import numpy as np
import pytest
from PIL import Image

from curation.pipeline.decode import DecodeError, decode_image, normalize_pixels, preprocess_config
from images import write_image_zoo

RGB_FILES = ["rgb_landscape.jpg", "rgb_portrait.png", "rgb_tiny.jpg", "rgb_wide.png", "rgb_square.jpg",
             "rgb_odd.png"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("zoo")
    return directory, write_image_zoo(directory)


def _decode(directory, name, size=32, **kwargs):
    return decode_image((directory / name).read_bytes(), size, **kwargs)


def test_every_zoo_file_gives_its_expected_outcome(zoo):
    directory, expected = zoo
    returned = set()
    for name, outcome in expected.items():
        result = _decode(directory, name)
        if outcome == "ok":
            assert isinstance(result, np.ndarray), (name, result)
            assert result.shape == (32, 32, 3) and result.dtype == np.uint8, name
            returned.add("ok")
        else:
            assert isinstance(result, DecodeError), name
            assert result.kind == outcome, (name, result)
            assert result.message, name
            returned.add(result.kind)
    # what decode_image actually returned spans every error kind, not only what the zoo expects
    assert {"ok", "empty", "not_an_image", "truncated", "corrupt", "too_large"} <= returned


def test_no_exception_escapes_for_damaged_bytes(zoo):
    """Every prefix length and random garbage after a valid header: a result, never a raise."""
    directory, expected = zoo
    rng = np.random.default_rng(0)
    for name in [n for n, outcome in expected.items() if outcome == "ok"]:
        data = (directory / name).read_bytes()
        for cut in np.linspace(1, len(data) - 1, 7).astype(int):
            damaged = [data[:cut], data[:cut] + rng.bytes(64)]
            for blob in damaged:
                assert isinstance(decode_image(blob, 16), (np.ndarray, DecodeError))
    for _ in range(50):
        assert isinstance(decode_image(rng.bytes(int(rng.integers(1, 300))), 16), DecodeError)


@pytest.mark.parametrize("name", RGB_FILES)
def test_pixels_match_open_clip_tiny_clip_transform(zoo, name):
    import open_clip

    from curation.models import register_local_configs

    register_local_configs()
    transform = _tiny_transform()
    size, mean, std = preprocess_config("tiny-clip", None)
    ours = normalize_pixels(_decode(zoo[0], name, size)[None], mean, std)[0]
    theirs = transform(Image.open(zoo[0] / name))
    assert ours.shape == theirs.shape == (3, size, size)
    assert float((ours - theirs).abs().max()) <= 1e-6
    assert open_clip.OPENAI_DATASET_MEAN == mean


@pytest.mark.parametrize("name", RGB_FILES)
def test_pixels_match_open_clip_224_eval_transform(zoo, name):
    import open_clip

    transform = open_clip.image_transform(224, is_train=False)
    ours = normalize_pixels(_decode(zoo[0], name, 224)[None], open_clip.OPENAI_DATASET_MEAN,
                            open_clip.OPENAI_DATASET_STD)[0]
    theirs = transform(Image.open(zoo[0] / name))
    assert float((ours - theirs).abs().max()) <= 1e-6


_TRANSFORM = {}


def _tiny_transform():
    """open_clip's own eval transform for tiny-clip, built once (random weights, no download)."""
    if "tiny" not in _TRANSFORM:
        import open_clip

        _TRANSFORM["tiny"] = open_clip.create_model_and_transforms("tiny-clip")[2]
    return _TRANSFORM["tiny"]


def test_normalize_pixels_shapes_and_range():
    batch = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)])
    out = normalize_pixels(batch, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert out.shape == (2, 3, 8, 8) and str(out.dtype) == "torch.float32"
    assert float(out[0].min()) == -1.0 and float(out[1].max()) == 1.0


def test_16bit_gray_is_scaled_not_clipped_to_white(zoo):
    pixels = _decode(zoo[0], "gray16.png", 64).astype(int)
    assert 100 < pixels.mean() < 155
    columns = pixels[..., 0].mean(axis=0)  # the left-to-right gradient survives (edges cropped)
    assert (np.diff(columns) >= 0).all() and columns[-1] - columns[0] > 150


def test_alpha_and_palette_transparency_are_composited_on_white(zoo):
    assert (_decode(zoo[0], "rgba_transparent.png") == 255).all()
    assert (_decode(zoo[0], "la_transparent.png") == 255).all()
    palette = _decode(zoo[0], "palette_transparent.png").astype(int)
    assert (palette[:, :14] == [255, 0, 0]).all()  # opaque red half
    assert (palette[:, -14:] == 255).all()  # transparent half is white, not black


@pytest.mark.parametrize("name,color", [("animated.gif", (255, 0, 0)), ("animated.png", (0, 255, 0)),
                                        ("animated.webp", (0, 0, 255))])
def test_animation_gives_first_frame(zoo, name, color):
    pixels = _decode(zoo[0], name).reshape(-1, 3).astype(int)
    assert np.abs(pixels - color).max() <= 2


def test_cmyk_and_gray_become_rgb(zoo):
    cyan = _decode(zoo[0], "cmyk.jpg").reshape(-1, 3).astype(int).mean(axis=0)
    assert np.allclose(cyan, (0, 255, 255), atol=4)
    gray = _decode(zoo[0], "gray.jpg")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_max_pixels_is_respected(zoo):
    assert _decode(zoo[0], "rgb_square.jpg", max_pixels=224 * 224).shape == (32, 32, 3)
    result = _decode(zoo[0], "rgb_square.jpg", max_pixels=224 * 224 - 1)
    assert isinstance(result, DecodeError) and result.kind == "too_large"


def _pil_image_allocations() -> int:
    """Images PIL has allocated pixel storage for so far in this process (its allocator's counter)."""
    return Image.core.get_stats()["new_count"]


@pytest.mark.parametrize("name", ["bomb_81mp.png", "bomb_95mp.png", "bomb_400mp.png"])
def test_bomb_refused_quickly_without_allocating_pixels(zoo, name):
    assert (zoo[0] / name).stat().st_size < 100_000  # the zoo keeps bombs small on disk
    before, start = _pil_image_allocations(), time.perf_counter()
    assert _decode(zoo[0], name).kind == "too_large"
    assert time.perf_counter() - start < 0.5
    assert _pil_image_allocations() == before


def test_allocation_probe_would_see_a_decoded_bomb(zoo, monkeypatch):
    """Control for the test above: really loading the 81 MP bomb allocates pixel storage."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    before = _pil_image_allocations()
    with Image.open(zoo[0] / "bomb_81mp.png") as image:
        image.load()
    assert _pil_image_allocations() == before + 1


def test_preprocess_config_without_building_a_model():
    import open_clip

    size, mean, std = preprocess_config("tiny-clip", None)
    assert (size, mean, std) == (32, tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD))
    normalize = _tiny_transform().transforms[-1]
    assert tuple(normalize.mean) == mean and tuple(normalize.std) == std
    assert preprocess_config("ViT-B-32", "openai")[0] == 224
    assert preprocess_config("ViT-L-14", "laion2b_s32b_b82k") == (224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_preprocess_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-model'.*Available"):
        preprocess_config("no-such-model", None)
    with pytest.raises(ValueError, match="resize_mode='squash'"):
        preprocess_config("ViT-B-16-SigLIP", "webli")


def test_unsupported_mode_is_reported_not_raised():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.float32)).save(buffer, format="TIFF")
    result = decode_image(buffer.getvalue(), 16)
    assert isinstance(result, DecodeError) and result.kind == "unsupported"


def _photo_jpeg(long_side: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((long_side, long_side * 3 // 4), Image.BICUBIC)
    pixels = np.asarray(image, np.int16) + rng.integers(-4, 5, (long_side * 3 // 4, long_side, 3))
    sink = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(sink, format="JPEG", quality=90)
    return sink.getvalue()


def test_jpeg_draft_stays_within_the_measured_tolerance_and_is_exact_below_4x():
    """source.jpeg_draft: a JPEG 4x the target or larger decodes at a reduced scale (>= 2x the
    target) within a few levels of the exact pixels; smaller JPEGs and other formats are exact."""
    big = _photo_jpeg(2048)
    exact, draft = decode_image(big, 224), decode_image(big, 224, draft=True)
    diff = np.abs(exact.astype(np.int16) - draft.astype(np.int16))
    assert 0 < diff.mean() < 0.5 and diff.max() <= 8
    small = _photo_jpeg(800)  # shorter side 600 < 4 x 224: no reduction
    assert np.array_equal(decode_image(small, 224), decode_image(small, 224, draft=True))
    png = io.BytesIO()
    Image.open(io.BytesIO(big)).save(png, format="PNG")
    assert np.array_equal(decode_image(png.getvalue(), 224), decode_image(png.getvalue(), 224, draft=True))


def test_jpeg_draft_is_part_of_the_decision_only_when_on():
    from curation.config import load_config

    off, on = load_config(None, []), load_config(None, ["source.jpeg_draft=true"])
    assert off.decision_hash() == load_config(None, ["source.jpeg_draft=false"]).decision_hash()
    assert on.decision_hash() != off.decision_hash()
