"""LPIPS perceptual distance with the VGG16 trunk, equal to ``lpips.LPIPS(net="vgg")`` v0.1.

The trunk is torchvision's ImageNet VGG16 (``vgg16-397923af.pth``), rebuilt here layer for layer so
its state-dict keys match that checkpoint and torchvision is not needed. The five linear heads are
the v0.1 weights that ship inside torchmetrics. :class:`LPIPS` only builds layers;
:func:`load_lpips` finds and loads the weights, using :func:`resolve_vgg16_weights` for the trunk.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import torch
from torch import Tensor, nn

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"
# torch.hub's convention: the hex digits after the dash start the file's SHA-256.
VGG16_HASH_PREFIX = "397923af"

# VGG16 `features` layout as in torchvision: conv widths, "M" for a 2x2 max-pool. Indices 0..29 are
# built (the final pool at 30 is never used by LPIPS).
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the ends of lpips' slices
# [0:4], [4:9], [9:16], [16:23], [23:30].
_TAPS = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)


class LPIPSWeightsNotFound(FileNotFoundError):
    """The VGG16 trunk weights could not be found or downloaded."""


class LPIPSWeightsError(ValueError):
    """An LPIPS weight file exists but cannot be used: unreadable, corrupt, or other weights."""


TRAINING_OPTION = f"in the config (or --set): loss.lpips_weights=/path/to/{VGG16_FILENAME}"


def _how_to_supply(hub_checkpoints: Path, option: str) -> str:
    return (
        f"To supply {VGG16_FILENAME}, do one of:\n"
        f"  - pass its path {option}\n"
        f"  - copy it into {hub_checkpoints}/\n"
        f"  - set TORCH_HOME to a directory whose hub/checkpoints/ holds it"
    )


def resolve_vgg16_weights(path: str | Path | None = None, download: bool = True, option: str = TRAINING_OPTION) -> Path:
    """Return the path of torchvision's VGG16 checkpoint: ``path``, else the torch hub cache,
    else a fresh download into that cache. Raises :class:`LPIPSWeightsNotFound` naming every
    place looked in, and ``option``: how the caller's user passes the path."""
    # get_dir() is read at call time so that $TORCH_HOME (and torch.hub.set_dir) are honoured.
    hub_checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if path is not None:
        explicit = Path(path).expanduser()
        if explicit.is_file():
            return explicit
        # An explicit path that is wrong is a mistake to report, not a reason to look elsewhere.
        raise LPIPSWeightsNotFound(
            f"LPIPS VGG16 weights not found at the given path {explicit} "
            f"(expected torchvision's {VGG16_FILENAME}).\n" + _how_to_supply(hub_checkpoints, option)
        )

    cached = hub_checkpoints / VGG16_FILENAME
    if cached.is_file():
        return cached

    if download:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # Writes to a temporary file and renames it, so a failed download leaves nothing behind.
            torch.hub.download_url_to_file(VGG16_URL, str(cached), hash_prefix=VGG16_HASH_PREFIX)
        except (OSError, RuntimeError) as err:  # URLError/timeouts are OSError; bad hash is RuntimeError
            tried = f"Download from {VGG16_URL} failed: {type(err).__name__}: {err}"
        else:
            return cached
    else:
        tried = f"Download from {VGG16_URL} not attempted (download=False)."

    raise LPIPSWeightsNotFound(
        f"LPIPS needs torchvision's ImageNet VGG16 weights, {VGG16_FILENAME}, and found none.\n"
        f"Looked in:\n  - {cached} (torch hub cache, $TORCH_HOME/hub/checkpoints)\n"
        f"{tried}\n" + _how_to_supply(hub_checkpoints, option)
    )


def lpips_heads_path() -> Path:
    """Path of the v0.1 LPIPS linear heads for VGG that ship inside torchmetrics."""
    path = Path(str(importlib.resources.files("torchmetrics"))) / "functional/image/lpips_models/vgg.pth"
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS linear heads not found at {path} (shipped by torchmetrics)")
    return path


def normalize_channels(x: Tensor, eps: float = 1e-20) -> Tensor:
    """Unit-normalise ``x`` (B, C, H, W) along channels; finite value and gradient at x = 0."""
    # lpips computes x / (sqrt(sum x^2) + 1e-10). sqrt has an infinite derivative at 0, so wherever
    # all channels are zero (constant or identical images after the ReLUs) its backward makes NaN.
    # In eager mode the ReLU's backward happens to drop those NaNs before they reach the input, but
    # they are still computed (detect_anomaly stops on them) and nothing guarantees the masking.
    # rsqrt(s + 1e-20) is finite there, and for any s >> 1e-20 it equals 1 / (sqrt(s) + 1e-10) to
    # relative error ~1e-10 / sqrt(s), far below float32 resolution for real VGG features.
    sum_sq = x.square().sum(dim=1, keepdim=True)  # (B, 1, H, W)
    return x * torch.rsqrt(sum_sq + eps)


def _vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 ``features`` up to relu5_3 (indices 0..29), with the same indices."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_channels = item
    return nn.Sequential(*layers)


class _NetLinLayer(nn.Module):
    """lpips' ``NetLinLayer``: dropout then a bias-free 1x1 conv to one channel (keys ``model.1.*``)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(in_channels, 1, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS v0.1 with VGG16: frozen, always in eval mode, computed in float32.

    ``forward(x0, x1)`` takes images (B, 3, H, W) in [-1, 1] and returns distances (B, 1, 1, 1).
    Gradients flow to the inputs only. Build it with :func:`load_lpips` to get trained weights.
    """

    def __init__(self) -> None:
        super().__init__()
        # lpips' ScalingLayer: maps [-1, 1] images to ImageNet-normalised inputs.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_features()
        self.lin0 = _NetLinLayer(_TAP_CHANNELS[0])
        self.lin1 = _NetLinLayer(_TAP_CHANNELS[1])
        self.lin2 = _NetLinLayer(_TAP_CHANNELS[2])
        self.lin3 = _NetLinLayer(_TAP_CHANNELS[3])
        self.lin4 = _NetLinLayer(_TAP_CHANNELS[4])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode whatever ``mode`` is: the heads' dropout must never be active."""
        return super().train(False)

    def taps(self, x: Tensor) -> list[Tensor]:
        """VGG16 activations at relu1_2 .. relu5_3 for images ``x`` (B, 3, H, W) in [-1, 1]."""
        h = (x - self.shift) / self.scale
        outs = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                outs.append(h)  # (B, C_k, H / 2^k, W / 2^k)
        return outs

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        """LPIPS distance (B, 1, 1, 1) between images ``x0``, ``x1`` (B, 3, H, W) in [-1, 1]."""
        # fp32 whatever the caller's autocast: the reference is fp32, and bf16 features would make
        # small distances noise.
        with torch.autocast(device_type=x0.device.type, enabled=False):
            # Two passes rather than one on torch.cat([x0, x1]): when x1 needs no gradient (the
            # usual target), its pass keeps no activations for backward.
            taps0 = self.taps(x0.float())
            taps1 = self.taps(x1.float())
            heads = (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)
            dist: Tensor | float = 0.0
            for f0, f1, head in zip(taps0, taps1, heads):
                diff = (normalize_channels(f0) - normalize_channels(f1)).square()  # (B, C, h, w)
                dist = dist + head(diff).mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
        return dist


def _load_trunk(model: LPIPS, path: Path) -> None:
    """Load the ``features.*`` tensors (indices < 30) of a torchvision VGG16 checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean a bad file
        raise LPIPSWeightsError(f"could not read VGG16 weights from {path}: {err}") from err
    if not isinstance(state, dict):
        raise LPIPSWeightsError(f"{path} does not hold a state dict (got {type(state).__name__})")
    # The checkpoint also has features.30 (no params) and classifier.*, which LPIPS does not use.
    trunk = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < 30:
            trunk[key] = value
    try:
        # Loaded under the name "features" so that error messages show the checkpoint's own keys.
        nn.ModuleDict({"features": model.features}).load_state_dict(trunk, strict=True)
    except RuntimeError as err:
        raise LPIPSWeightsError(f"{path} is not torchvision's VGG16 checkpoint ({VGG16_FILENAME}): {err}") from err


def _load_heads(model: LPIPS, path: Path) -> None:
    """Load the v0.1 linear heads ``lin0.model.1.weight`` .. ``lin4.model.1.weight``."""
    reinstall = "the file ships with torchmetrics: reinstall it (pip install --force-reinstall --no-deps torchmetrics)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated or not a plain state file
        raise LPIPSWeightsError(f"could not read the LPIPS linear heads {path} ({type(err).__name__}: "
                                f"{str(err)[:200]}); {reinstall}") from None
    heads = nn.ModuleDict({f"lin{k}": getattr(model, f"lin{k}") for k in range(5)})
    try:
        heads.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise LPIPSWeightsError(f"{path} does not hold the LPIPS v0.1 VGG linear heads: {err}; {reinstall}") from err


def load_lpips(vgg_weights: str | Path | None = None, download: bool = True, option: str = TRAINING_OPTION) -> LPIPS:
    """Build :class:`LPIPS` with torchvision's VGG16 trunk (found by :func:`resolve_vgg16_weights`,
    whose ``option`` tells how to pass the file) and torchmetrics' v0.1 heads; returned frozen, in
    eval mode, on the CPU."""
    model = LPIPS()
    _load_trunk(model, resolve_vgg16_weights(vgg_weights, download=download, option=option))
    _load_heads(model, lpips_heads_path())
    return model
