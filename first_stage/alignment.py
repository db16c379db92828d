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
Face cache, never downloaded; it runs frozen and without gradients, its features in fp32. By
default it sees what VA-VAE's DINOv2 sees (``vavae/ldm/models/foundation_models.py``
``forward_dinov2``): the raw [-1, 1] image resized with plain bilinear (``align_corners=False``, no
antialias) to the patch grid, and P is a 1x1 convolution without bias (``vavae/ldm/models/
autoencoder.py``, ``reverse_proj``), so a VA-VAE ``linear_proj.weight`` loads into it. The
``alignment`` options ``normalize``, ``interpolation``, ``antialias`` and ``projection_bias`` are
this package's departures (docs/training.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .config import AlignmentConfig, Config, ConfigError
from .loss_term import LossContext, LossTerm, adaptive_weight
from .model import DTYPES

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
    on the latent grid (h, w), in fp32. Inputs are resized to its patch grid as :meth:`forward`'s
    options say (VA-VAE's by default); ``mean`` and ``std`` are its image processor's, for the
    ``normalize`` option. The model runs under autocast to ``autocast`` (the run's mixed precision)
    when given, its features come out in fp32."""

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
    def forward(self, x: torch.Tensor, grid: tuple[int, int], normalize: bool = False,
                interpolation: str = "bilinear", antialias: bool = False) -> torch.Tensor:
        """Features of (B,3,H,W) images on ``grid``. By default VA-VAE's input, the raw [-1, 1] image
        bilinearly resized; ``normalize``: the processor's mean and std; ``interpolation`` and
        ``antialias``: those of ``F.interpolate`` (``alignment.*`` of the same names)."""
        x = x.float()
        if normalize:
            x = ((x + 1) / 2 - self.mean) / self.std
        size = (grid[0] * self.patch, grid[1] * self.patch) if self.grid == "latent" else (self.image_size,) * 2
        x = F.interpolate(x, size=size, mode=interpolation, align_corners=False, antialias=antialias)
        with torch.autocast(x.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            hidden = self.model(pixel_values=x).last_hidden_state  # (B, prefix + gh*gw, D), after the final norm
        gh, gw = size[0] // self.patch, size[1] // self.patch
        features = hidden[:, self.prefix:].float().transpose(1, 2).reshape(x.shape[0], self.dim, gh, gw)
        if (gh, gw) != tuple(grid):
            features = F.interpolate(features, size=grid, mode="bilinear", align_corners=False, antialias=antialias)
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
        raise AlignmentModelError("alignment needs the transformers package: "
                                  "pip install 'first-stage[alignment]'") from None
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


def build_projection(latent_channels: int, feature_dim: int, init_from: str | None = None,
                     bias: bool = False) -> nn.Conv2d:
    """The trained 1x1 projection of latents to the feature size (VA-VAE's ``linear_proj``: no
    bias unless ``bias``, ``alignment.projection_bias``), fresh or from an export's
    ``finetune/alignment_projection.safetensors``. A file with a bias where none is asked for, or
    without one where one is, is a :class:`ConfigError` that names the key to set."""
    projection = nn.Conv2d(latent_channels, feature_dim, kernel_size=1, bias=bias)
    if init_from is not None:
        if not Path(init_from).is_file():
            raise FileNotFoundError(f"alignment.projection_init: no file at {Path(init_from).resolve()}")
        state = load_file(init_from)
        if ("bias" in state) != bias:
            has = "has a bias (written before projections followed VA-VAE's, without one)" if "bias" in state \
                else "has no bias (VA-VAE's layout)"
            raise ConfigError(f"alignment.projection_init: {init_from} {has}; set alignment.projection_bias: "
                              f"{str('bias' in state).lower()} to load it")
        projection.load_state_dict(state)
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
        cfg = self.cfg
        target = self.features(inputs, tuple(projected.shape[-2:]), cfg.normalize, cfg.interpolation,
                               cfg.antialias)  # (B,D,h,w)
        cos, dist = alignment_terms(projected, target, self.cfg.cos_margin, self.cfg.distance_margin)
        combined = self.cfg.cos_weight * cos + self.cfg.distance_weight * dist
        return combined, {"train/loss/align_cos": cos.item(), "train/loss/align_distance": dist.item()}


class AlignmentTerm(LossTerm):
    """VA-VAE's alignment as a loss-term unit: the frozen vision model is loaded by :meth:`build`,
    which returns the trained projection for the DDP wrapper; the loss is ``w · a ·`` the margins'
    terms, ``a`` the adaptive weight at the encoder's last layer (or 1)."""

    name, section = "alignment", "alignment"
    needs_vision_model = True
    bench_rows = {"alignment": ["alignment.enabled=true"],
                  # without the adaptive weight's extra backward
                  "alignment_fixed_weight": ["alignment.enabled=true", "alignment.adaptive=false"]}
    study_variant = ("align", ["alignment.enabled=true"],
                     "VA-VAE: DINOv2 patch features through a trained 1x1 projection, margins 0.5 / 0.25, adaptive")

    @classmethod
    def check(cls, config: Config) -> None:
        check_alignment(config.alignment)
        if config.alignment.enabled and config.model.trainable != "all":
            raise ConfigError("alignment.enabled needs model.trainable: all (it trains the encoder's latents)")

    def build(self, vae, device: torch.device) -> nn.Module:
        acfg = self.config.alignment
        autocast = DTYPES.get(self.config.train.mixed_precision)  # None for "no"
        features = load_foundation_model(acfg.model, acfg.grid, autocast).to(device)
        self.alignment = AlignmentLoss(acfg, features)
        return build_projection(vae.config.latent_channels, features.dim, acfg.projection_init,
                                acfg.projection_bias).to(device)

    def loss(self, out, ctx: LossContext) -> tuple[torch.Tensor, dict]:
        acfg = self.config.alignment
        align, logs = self.alignment(out.inputs, out.projected)
        weight = acfg.weight
        if acfg.adaptive:
            if ctx.encoder_last_layer is None:
                raise ValueError("the adaptive alignment weight needs the encoder's last layer")
            weight = weight * adaptive_weight(ctx.nll, align, ctx.encoder_last_layer, acfg.adaptive_weight_max)
        return weight * align, {**logs, "train/align_weight": float(weight)}

    def card_line(self) -> str:
        a = self.config.alignment
        adaptive = f" × the adaptive weight (max {a.adaptive_weight_max:g})" if a.adaptive else ""
        departures = [name for name, on in (("ImageNet-normalised input", a.normalize),
                                            ("bicubic resize", a.interpolation == "bicubic"),
                                            ("antialiased resize", a.antialias),
                                            ("projection with a bias", a.projection_bias)) if on]
        inputs = ("; departing from VA-VAE: " + ", ".join(departures) if departures
                  else "; input as VA-VAE's (raw [-1, 1], plain bilinear), bias-free projection")
        return (f"alignment to `{a.model}` patch features (VA-VAE), weight {a.weight:g}{adaptive}: "
                f"{a.cos_weight:g} × cosine (margin {a.cos_margin:g}) + {a.distance_weight:g} × distance matrix "
                f"(margin {a.distance_margin:g}), grid `{a.grid}`{inputs}")
