"""The original latent-diffusion ("LDM") key layout of an autoencoder, both ways.

Single-file loaders of the Stable Diffusion ecosystem (diffusers' ``from_single_file``, ComfyUI,
A1111) read VAE weights under latent-diffusion's names: ``encoder.down.{i}.block.{j}``,
``decoder.up.{i}`` numbered from the *lowest* resolution, ``mid.block_1``, ``mid.attn_1.{q,k,v,proj_out}``
as 1x1 convolutions, ``nin_shortcut``, ``norm_out``. The map below is written as renaming rules over
diffusers' key names, so it covers every architecture ``AutoencoderKL`` can express (any number of
levels and layers per block, any widths, attention in levels or not, with or without the quant
convs), and the same rules run backwards for the import.

Black Forest Labs' layout of FLUX.2's VAE (``black-forest-labs/flux2`` ``src/flux2/autoencoder.py``,
``ae.safetensors``, loaded with ``strict=True``) is the same layout with ``quant_conv`` under ``encoder.``,
``post_quant_conv`` under ``decoder.``, and the BatchNorm's ``bn.running_mean``, ``bn.running_var`` (and,
optionally, ``bn.num_batches_tracked``): :func:`to_bfl_state_dict` and :func:`from_bfl_state_dict` move
those keys and use the latent-diffusion rules for the rest.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2
from safetensors import safe_open
from safetensors.torch import load_file

from .model import CLASS_ARGS, Autoencoder, class_of_config

# Prefixes under which whole-model checkpoints hold the autoencoder (SD 1.x/2.x/XL checkpoints,
# some VAE-only files). A latent-diffusion autoencoder checkpoint has no prefix.
LDM_PREFIXES = ("first_stage_model.", "vae.")
# Where a latent-diffusion autoencoder checkpoint (model.ckpt of kl-f8) keeps its loss's state.
LDM_DISCRIMINATOR_PREFIX = "loss.discriminator."
LDM_LOGVAR_KEY = "loss.logvar"
# Where a LightningDiT VA-VAE checkpoint (hustvl/LightningDiT vavae/ldm/models/autoencoder.py) keeps its
# alignment projection: with reverse_proj a bias-free 1x1 Conv2d from the latent to DINOv2's features.
VAVAE_PROJECTION_KEY = "linear_proj.weight"

# (diffusers fragment, LDM fragment), applied in order after the block indices are mapped.
_RENAMES = (
    ("mid_block.resnets.0.", "mid.block_1."),
    ("mid_block.resnets.1.", "mid.block_2."),
    ("mid_block.attentions.0.", "mid.attn_1."),
    ("downsamplers.0.", "downsample."),
    ("upsamplers.0.", "upsample."),
    ("conv_shortcut.", "nin_shortcut."),
    ("conv_norm_out.", "norm_out."),
)
# Inside an attention block (mid.attn_1 or a level's attn.{j}).
_ATTENTION_RENAMES = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                      ("to_out.0.", "proj_out."))
_ATTENTION_PROJECTIONS = ("q.weight", "k.weight", "v.weight", "proj_out.weight")


def _is_ldm_attention(key: str) -> bool:
    return bool(re.search(r"(mid\.attn_1|\.attn\.\d+)\.", key))


def _map_levels(key: str, num_levels: int, to_ldm: bool) -> str:
    """``encoder.down_blocks.{i}.resnets.`` ↔ ``encoder.down.{i}.block.`` (``attentions.`` ↔ ``attn.``);
    the decoder's ``up_blocks.{i}`` ↔ ``up.{num_levels-1-i}``: latent-diffusion counts up levels from the bottom."""
    for coder, diffusers_level, ldm_level, flip in (("encoder", "down_blocks", "down", False),
                                                    ("decoder", "up_blocks", "up", True)):
        src, dst = (diffusers_level, ldm_level) if to_ldm else (ldm_level, diffusers_level)
        match = re.match(rf"{coder}\.{src}\.(\d+)\.", key)
        if match is None:
            continue
        level, rest = int(match.group(1)), key[match.end():]
        for diffusers_part, ldm_part in (("resnets.", "block."), ("attentions.", "attn.")):
            old, new = (diffusers_part, ldm_part) if to_ldm else (ldm_part, diffusers_part)
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        return f"{coder}.{dst}.{num_levels - 1 - level if flip else level}.{rest}"
    return key


def diffusers_to_ldm_key(key: str, num_levels: int) -> str:
    """``decoder.up_blocks.0.resnets.1.conv1.weight`` → ``decoder.up.{num_levels-1}.block.1.conv1.weight``."""
    key = _map_levels(key, num_levels, to_ldm=True)
    for new, old in _RENAMES:
        key = key.replace(new, old)
    if _is_ldm_attention(key):
        for new, old in _ATTENTION_RENAMES:
            key = key.replace(new, old)
    return key


def ldm_to_diffusers_key(key: str, num_levels: int) -> str:
    """The inverse of :func:`diffusers_to_ldm_key`."""
    if _is_ldm_attention(key):
        for new, old in _ATTENTION_RENAMES:
            key = re.sub(rf"(attn_1|attn\.\d+)\.{re.escape(old)}", rf"\1.{new}", key)
    for new, old in _RENAMES:
        key = key.replace(old, new)
    return _map_levels(key, num_levels, to_ldm=False)


def to_ldm_state_dict(vae: Autoencoder) -> dict[str, torch.Tensor]:
    """The autoencoder's weights under latent-diffusion names; attention projections become
    (C, C, 1, 1) convolutions as in latent-diffusion's ``AttnBlock``."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        new = diffusers_to_ldm_key(key, levels)
        if ldm_to_diffusers_key(new, levels) != key or new in out:
            raise AssertionError(f"LDM key map is not one-to-one at {key!r} -> {new!r}")  # a new diffusers layout
        if _is_ldm_attention(new) and new.endswith(_ATTENTION_PROJECTIONS):
            value = value[:, :, None, None]
        out[new] = value.contiguous()
    return out


def from_ldm_state_dict(state: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Latent-diffusion VAE weights (no prefix) → diffusers ``AutoencoderKL`` state dict."""
    out = {}
    for key, value in state.items():
        if _is_ldm_attention(key) and key.endswith(_ATTENTION_PROJECTIONS) and value.ndim > 2:
            value = value.reshape(value.shape[0], value.shape[1])  # 1x1 conv (C,C,1,1) or conv1d → linear
        out[ldm_to_diffusers_key(key, num_levels)] = value
    return out


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` file, or of a ``.ckpt``/``.pt``/``.pth`` file loaded
    with ``torch.load(weights_only=True)`` (never unpickling code); a Lightning checkpoint's
    ``state_dict`` is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weight file at {path.resolve()}")
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) ({err}); "
                         "only tensors are loaded from .ckpt/.pt files. Convert it to .safetensors first.") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}


def split_ldm_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict, dict, torch.Tensor | None]:
    """(VAE weights without prefix, discriminator weights, log-variance or None) of a checkpoint."""
    prefix = next((p for p in LDM_PREFIXES if any(k.startswith(p) for k in state)), "")
    parts = ("encoder", "decoder", "quant_conv", "post_quant_conv", "bn")
    vae = {k[len(prefix):]: v for k, v in state.items()
           if k.startswith(prefix) and k[len(prefix):].split(".")[0] in parts}
    if not vae:
        raise ValueError("no autoencoder weights found: expected keys like 'encoder.conv_in.weight' "
                         f"(optionally under {' or '.join(LDM_PREFIXES)})")
    disc = {k[len(LDM_DISCRIMINATOR_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_DISCRIMINATOR_PREFIX)}
    return vae, disc, state.get(LDM_LOGVAR_KEY)


def vavae_projection(state: dict[str, torch.Tensor], latent_channels: int) -> dict[str, torch.Tensor] | None:
    """The alignment projection of a LightningDiT VA-VAE checkpoint as this package's projection state
    dict (``{"weight": (D, C, 1, 1)}``), or None. Only VA-VAE's ``reverse_proj`` direction (latent →
    features, the recipe's) fits it; the other maps features to the latent and is left out."""
    weight = state.get(VAVAE_PROJECTION_KEY)
    if weight is None or weight.ndim != 4 or weight.shape[1] != latent_channels:
        return None
    projection = {"weight": weight}
    if "linear_proj.bias" in state:
        projection["bias"] = state["linear_proj.bias"]
    return projection


def infer_autoencoder_config(state: dict[str, torch.Tensor], norm_num_groups: int = 32) -> dict:
    """``AutoencoderKL`` arguments read off the shapes of latent-diffusion VAE weights.

    The GroupNorm group count leaves no trace in the weights: latent-diffusion always uses 32,
    which is the default here; a file written by this package carries its config in its metadata.
    """
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    channels = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels))
    decoder = tuple(state[f"decoder.up.{i}.block.0.conv1.weight"].shape[0] for i in range(levels))
    return {
        "in_channels": state["encoder.conv_in.weight"].shape[1],
        "out_channels": state["decoder.conv_out.weight"].shape[0],
        "block_out_channels": channels,
        "down_block_types": tuple("AttnDownEncoderBlock2D" if f"encoder.down.{i}.attn.0.q.weight" in state
                                  else "DownEncoderBlock2D" for i in range(levels)),
        # diffusers' up block i is latent-diffusion's up.{levels-1-i}
        "up_block_types": tuple("AttnUpDecoderBlock2D" if f"decoder.up.{levels - 1 - i}.attn.0.q.weight" in state
                                else "UpDecoderBlock2D" for i in range(levels)),
        "layers_per_block": len(blocks),
        "latent_channels": state["decoder.conv_in.weight"].shape[1],
        "norm_num_groups": norm_num_groups,
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state,
        # a narrower decoder (AutoencoderKLFlux2 only: AutoencoderKL builds the decoder with the encoder's widths)
        "decoder_block_out_channels": decoder if decoder != channels else None,
    }


def autoencoder_from_ldm(vae_state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                         overrides: dict | None = None, where: str = "the weights") -> Autoencoder:
    """An ``AutoencoderKL`` holding latent-diffusion VAE weights (no prefix), or an ``AutoencoderKLFlux2``
    when they hold a BatchNorm (``bn.*``); every key must match.

    The architecture comes from the file's metadata (files written by this package carry
    ``autoencoder_config``) or from the weight shapes (:func:`infer_autoencoder_config`), then ``overrides``.
    """
    if metadata and "autoencoder_config" in metadata:
        config = json.loads(metadata["autoencoder_config"])
    else:
        config = infer_autoencoder_config(vae_state)
        if any(k.startswith("bn.") for k in vae_state):
            config["_class_name"] = "AutoencoderKLFlux2"
    cls = class_of_config(config, where)
    if cls is AutoencoderKLFlux2:
        patches = math.prod((overrides or {}).get("patch_size", config.get("patch_size", BFL_PATCH)))
        check_batch_norm(vae_state, config.get("latent_channels", 32) * patches, where)
    config = {k: v for k, v in {**config, **(overrides or {})}.items() if k in CLASS_ARGS[cls.__name__]}
    vae = cls(**config)
    converted = from_ldm_state_dict(vae_state, len(vae.config.block_out_channels))
    missing, unexpected = vae.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"the weights do not fit the architecture {json.dumps(config, default=str)}: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    return vae


# BFL's FLUX.2 AutoEncoder keeps the quant convs inside the encoder and decoder.
_BFL_MOVES = (("quant_conv.", "encoder.quant_conv."), ("post_quant_conv.", "decoder.post_quant_conv."))
BFL_BATCH_NORM = ("bn.running_mean", "bn.running_var")  # required; bn.num_batches_tracked is optional
BFL_EPS, BFL_PATCH = 1e-4, (2, 2)  # hard-coded in BFL's AutoEncoder (bn_eps, ps), so no file carries them
BFL_FILE_NAME = "ae.safetensors"  # as BFL names theirs


def is_bfl_layout(state: dict[str, torch.Tensor]) -> bool:
    """Whether weights are in BFL's FLUX.2 layout: quant convs under ``encoder.``/``decoder.``, or a ``bn``."""
    return any(k.startswith(("encoder.quant_conv.", "decoder.post_quant_conv.", "bn.")) for k in state)


def check_batch_norm(state: dict[str, torch.Tensor], channels: int, where: str) -> None:
    """Refuse FLUX.2-class weights whose BatchNorm statistics are missing or misshapen, naming the key:
    diffusers would go on with mean 0 and variance 1, a normalisation nobody trained a diffusion model on."""
    for key in BFL_BATCH_NORM:
        if key not in state:
            raise ValueError(f"{where}: no {key}: the FLUX.2 BatchNorm statistics that normalise its latents are "
                             "missing")
        if tuple(state[key].shape) != (channels,):
            raise ValueError(f"{where}: {key} has shape {tuple(state[key].shape)}, expected ({channels},) "
                             "(4 patch channels per latent channel)")
        if not torch.isfinite(state[key]).all() or (key.endswith("var") and (state[key] < 0).any()):
            raise ValueError(f"{where}: {key} holds non-finite or negative values")


def to_bfl_state_dict(vae: AutoencoderKLFlux2) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKLFlux2``'s weights in BFL's ``AutoEncoder`` layout, the BatchNorm statistics in float32."""
    out = {}
    for key, value in to_ldm_state_dict(vae).items():
        for ours, theirs in _BFL_MOVES:
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        out[key] = value.float() if key in BFL_BATCH_NORM else value
    return out


def from_bfl_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL-layout weights → the latent-diffusion layout this module imports (quant convs at the top)."""
    out = {}
    for key, value in state.items():
        for ours, theirs in _BFL_MOVES:
            if key.startswith(theirs):
                key = ours + key[len(theirs):]
        out[key] = value
    return out


def autoencoder_from_bfl(state: dict[str, torch.Tensor], where: str, metadata: dict[str, str] | None = None,
                         overrides: dict | None = None) -> AutoencoderKLFlux2:
    """An ``AutoencoderKLFlux2`` holding BFL-layout weights (``ae.safetensors``); its BatchNorm must be there.
    eps and the patch size are BFL's hard-coded ones unless the file's metadata (written by this package) says."""
    state = from_bfl_state_dict(state)
    if not (metadata and "autoencoder_config" in metadata):
        overrides = {"batch_norm_eps": BFL_EPS, "patch_size": BFL_PATCH, **(overrides or {})}
        metadata = {"autoencoder_config": json.dumps({**infer_autoencoder_config(state),
                                                      "_class_name": "AutoencoderKLFlux2"})}
    vae = autoencoder_from_ldm(state, metadata, overrides, where)
    if not isinstance(vae, AutoencoderKLFlux2):
        raise ValueError(f"{where}: BFL's layout holds an AutoencoderKLFlux2, but its metadata names another class")
    return vae


def bfl_obstacles(config) -> list[str]:
    """Why an ``AutoencoderKLFlux2`` config cannot be written in BFL's layout (empty when it can): BFL's
    ``AutoEncoder`` hard-codes what these name."""
    widths = tuple(config.block_out_channels)
    checks = [
        (config.norm_num_groups == 32, "32 GroupNorm groups"),
        (all(w % widths[0] == 0 for w in widths), "widths that are multiples of the first (ch · ch_mult)"),
        (config.decoder_block_out_channels in (None, widths, list(widths)), "the encoder's widths in the decoder"),
        (not any(t.startswith("Attn") for t in (*config.down_block_types, *config.up_block_types)),
         "no attention inside levels"),
        (config.mid_block_add_attention, "attention in the mid blocks"),
        (config.use_quant_conv and config.use_post_quant_conv, "quant_conv and post_quant_conv"),
        (config.act_fn == "silu", "the SiLU (swish) activation"),
        (tuple(config.patch_size) == BFL_PATCH, "2×2 patches"),
        (config.batch_norm_eps == BFL_EPS, "BatchNorm eps 1e-4"),
    ]
    return [f"BFL's AutoEncoder hard-codes {what}" for ok, what in checks if not ok]


def bfl_params(config) -> dict:
    """BFL's ``AutoEncoderParams`` that build the ``AutoEncoder`` an ``AutoencoderKLFlux2`` config's file loads into."""
    widths = list(config.block_out_channels)
    return {"in_channels": config.in_channels, "ch": widths[0], "out_ch": config.out_channels,
            "ch_mult": [w // widths[0] for w in widths], "num_res_blocks": config.layers_per_block,
            "z_channels": config.latent_channels}
