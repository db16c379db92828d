"""Representation alignment (VA-VAE, Yao et al. 2025, hustvl/LightningDiT ``vavae/``): the latents,
through a trained 1x1 projection P, are aligned with a frozen vision model's patch features f.

With z' = P(z) and f both (B, D, h, w), cosines taken over D at each of the N = h·w positions::

    cos   = mean_{b,i} relu(1 - m_cos - cos(z'_bi, f_bi))                       # marginal cosine
    dist  = mean_{b,i,j} relu(|cos(z'_bi, z'_bj) - cos(f_bi, f_bj)| - m_dist)  # marginal distance matrix
    loss  = w · a · (cos_weight · cos + distance_weight · dist)
    a     = clamp(|grad_E nll| / (|grad_E (cos_weight·cos + distance_weight·dist)| + 1e-4), 0, max)

with E the encoder's last convolution weight (``a = 1`` when ``alignment.adaptive`` is off). The
margins make the terms free once a position (or a pair) is close enough: VA-VAE's f16d32 recipe
uses w = 0.1, m_cos = 0.5, m_dist = 0.25.

The vision model is loaded with :func:`load_foundation_model` from a local folder or the Hugging
Face cache, never downloaded; it runs frozen and without gradients, its features in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .config import AlignmentConfig, ConfigError

PREPROCESSOR_FILE = "preprocessor_config.json"
PROJECTION_FILE = "alignment_projection.safetensors"  # in an export's finetune/ bundle


# (hidden size, layers, heads) of the DINOv2 ViTs (facebook/dinov2-*, patch 14, MLP ratio 4).
DINOV2_SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
# DINOv2's image processor: ImageNet mean and std.
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class AlignmentModelError(FileNotFoundError):
    """The vision model of ``alignment.model`` cannot be found or is not a patch-grid ViT."""


def alignment_terms(projected: torch.Tensor, features: torch.Tensor, cos_margin: float,
                    distance_margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(marginal cosine term, marginal distance-matrix term) of (B,D,h,w) projected latents and
    (B,D,h,w) features, in fp32 (formulas in the module docstring)."""
    z = F.normalize(projected.float().flatten(2), dim=1)  # (B,D,N), unit vectors over D
    f = F.normalize(features.float().flatten(2), dim=1)
    cos = (z * f).sum(1)  # (B,N)
    cos_term = F.relu(1 - cos_margin - cos).mean()
    gram_z, gram_f = z.transpose(1, 2) @ z, f.transpose(1, 2) @ f  # (B,N,N) cosines between positions
    distance_term = F.relu((gram_z - gram_f).abs() - distance_margin).mean()
    return cos_term, distance_term


class FoundationFeatures(nn.Module):
    """A frozen ViT (DINOv2) as a function of images: (B,3,H,W) in [-1,1] → (B,D,h,w) patch features
    on the latent grid (h, w), in fp32. Inputs are normalised with the model's image processor's
    mean and std and resized (bicubic, antialiased) to its patch grid; the model runs under autocast
    to ``autocast`` (the run's mixed precision) when given, its features come out in fp32."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], grid: str = "latent",
                 image_size: int = 224, autocast: torch.dtype | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        config = model.config
        self.patch = int(config.patch_size)
        self.image_size = image_size  # the processor's crop: the "model" grid's input side
        self.autocast = autocast
        self.prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)  # CLS (+ registers) before the patches
        self.dim = int(config.hidden_size)
        self.grid = grid
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> FoundationFeatures:
        super().train(mode)
        self.model.eval()  # frozen: dropout and the like stay off
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = ((x.float() + 1) / 2 - self.mean) / self.std
        size = (grid[0] * self.patch, grid[1] * self.patch) if self.grid == "latent" else (self.image_size,) * 2
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        with torch.autocast(x.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            hidden = self.model(pixel_values=x).last_hidden_state  # (B, prefix + gh*gw, D), after the final norm
        gh, gw = size[0] // self.patch, size[1] // self.patch
        features = hidden[:, self.prefix:].float().transpose(1, 2).reshape(x.shape[0], self.dim, gh, gw)
        if (gh, gw) != tuple(grid):
            features = F.interpolate(features, size=grid, mode="bilinear", align_corners=False, antialias=True)
        return features


def load_foundation_model(name: str, grid: str = "latent", autocast: torch.dtype | None = None) -> FoundationFeatures:
    """The frozen vision model ``name``: a local folder, or a Hugging Face id already in the local
    cache (``HF_HOME``). Nothing is downloaded; a missing model is an :class:`AlignmentModelError`
    that names it and says how to supply it. The ``"model"`` grid's input side is the processor's
    crop size (224 for DINOv2; its config's ``image_size``, 518, is only the position table's)."""
    how = (f"download it where there is network (`huggingface-cli download {name}`, into the cache that "
           f"HF_HOME points to) or set alignment.model to a local folder holding config.json, the weights "
           f"and {PREPROCESSOR_FILE}")
    try:
        from transformers import AutoModel
        from transformers.utils import cached_file
    except ImportError:
        raise AlignmentModelError("alignment needs the transformers package: pip install 'first-stage[alignment]'") from None
    path = Path(name).expanduser()
    if path.is_absolute() or name.startswith((".", "~")) or path.exists():  # a folder, not a model id
        if not path.is_dir():
            raise AlignmentModelError(f"alignment.model: no folder at {path.resolve()}; {how}")
        source, where = str(path), str(path.resolve())
    else:
        from huggingface_hub import constants
        source, where = name, f"the Hugging Face cache {constants.HF_HUB_CACHE}"
    try:
        model = AutoModel.from_pretrained(source, local_files_only=True)
        preprocessor = json.loads(Path(cached_file(source, PREPROCESSOR_FILE, local_files_only=True)).read_text())
    except OSError as err:
        raise AlignmentModelError(f"alignment.model: cannot load {name!r} from {where} "
                                  f"({str(err).splitlines()[0]}); {how}") from None
    if not hasattr(model.config, "patch_size") or "image_mean" not in preprocessor:
        raise AlignmentModelError(f"alignment.model: {name!r} is not a patch-grid vision transformer with an image "
                                  f"processor (need config.patch_size and image_mean/image_std in {PREPROCESSOR_FILE})")
    crop = preprocessor.get("crop_size") or {}
    side = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
    return FoundationFeatures(model, preprocessor["image_mean"], preprocessor["image_std"], grid,
                              int(side or getattr(model.config, "image_size", 224)), autocast)


def check_alignment(cfg: AlignmentConfig) -> None:
    """Refuse weights and margins out of range, naming the key."""
    for key in ("weight", "cos_weight", "distance_weight", "adaptive_weight_max"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"alignment.{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ("cos_margin", "distance_margin"):  # cosines and their differences lie in [-1, 1] and [0, 2]
        if not 0 <= getattr(cfg, key) <= 2:
            raise ConfigError(f"alignment.{key} must be in [0, 2], got {getattr(cfg, key)}")


def save_standin_dinov2(folder: str | Path, hidden: int, layers: int, heads: int, patch: int = 14,
                        image_size: int = 518, crop: int = 224, seed: int = 0) -> Path:
    """A randomly initialised DINOv2 (transformers' ``Dinov2Model``) with its processor file, laid out
    as a downloaded model folder: what tests and benchmarks load where the real weights are absent
    (the same shapes, so the same cost; features of random weights mean nothing)."""
    from transformers import Dinov2Config, Dinov2Model

    folder = Path(folder)
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=4 * hidden, patch_size=patch, image_size=image_size)
    Dinov2Model(config).save_pretrained(folder)
    (folder / PREPROCESSOR_FILE).write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
        "crop_size": {"height": crop, "width": crop}, "size": {"shortest_edge": crop * 256 // 224}}))
    return folder


def build_projection(latent_channels: int, feature_dim: int, init_from: str | None = None) -> nn.Conv2d:
    """The trained 1x1 projection of latents to the feature size, fresh or from an export's
    ``finetune/alignment_projection.safetensors``."""
    projection = nn.Conv2d(latent_channels, feature_dim, kernel_size=1)
    if init_from is not None:
        if not Path(init_from).is_file():
            raise FileNotFoundError(f"alignment.projection_init: no file at {Path(init_from).resolve()}")
        projection.load_state_dict(load_file(init_from))
    return projection


class AlignmentLoss(nn.Module):
    """The alignment terms of one forward pass, with the frozen model's features of its encoder
    input. Returns (unweighted combination, logs); the weighting (adaptive or not) is the
    generator loss's, which holds the NLL it is balanced against."""

    def __init__(self, cfg: AlignmentConfig, features: FoundationFeatures):
        super().__init__()
        self.cfg = cfg
        self.features = features

    def forward(self, inputs: torch.Tensor, projected: torch.Tensor) -> tuple[torch.Tensor, dict]:
        target = self.features(inputs, tuple(projected.shape[-2:]))  # (B,D,h,w)
        cos, dist = alignment_terms(projected, target, self.cfg.cos_margin, self.cfg.distance_margin)
        combined = self.cfg.cos_weight * cos + self.cfg.distance_weight * dist
        return combined, {"train/loss/align_cos": cos.item(), "train/loss/align_distance": dist.item()}
