"""The ``performance`` switches: precision, fused optimiser, compilation, memory format, gradient
checkpointing and attention kernels. What each one measured is in docs/benchmarks.md.

None of them changes what is saved: ``nn.Module.compile`` compiles a module in place and keeps its
``state_dict`` keys (no ``_orig_mod.`` prefix), and channels_last only changes strides.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .config import E2EConfig, OptimizerConfig, PerformanceConfig
from .model import Autoencoder


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and cuDNN convolutions (CUDA; no effect elsewhere)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def adamw(params, cfg: OptimizerConfig | E2EConfig, lr: float, fused: bool) -> torch.optim.AdamW:
    """AdamW with a section's betas, weight_decay and eps (``optimizer``'s, or ``e2e``'s for its transformer);
    ``fused`` runs the update as one kernel."""
    return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps,
                             fused=fused or None)


def prepare_autoencoder(vae: Autoencoder, cfg: PerformanceConfig, device: torch.device) -> Autoencoder:
    """Gradient checkpointing and the attention kernel, in place."""
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if cfg.attention == "xformers":
        if device.type != "cuda":
            raise ValueError(f"performance.attention=xformers needs a CUDA device, this run is on {device}; "
                             "use performance.attention=sdpa")
        try:
            import xformers.ops  # noqa: F401  (the import is the check)
        except ImportError as err:
            raise ImportError("performance.attention=xformers: the xformers package does not load "
                              f"({err}); pip install -e '.[xformers]', or use performance.attention=sdpa") from err
        vae.enable_xformers_memory_efficient_attention()
    # "sdpa" is diffusers' default processor (AttnProcessor2_0, torch's scaled_dot_product_attention).
    return vae


def set_memory_format(modules: list[nn.Module | None], cfg: PerformanceConfig) -> None:
    """Convolution weights in NHWC (channels_last) when the switch is on, in place."""
    for module in modules:
        if module is not None and cfg.channels_last:
            module.to(memory_format=torch.channels_last)


def to_memory_format(x: torch.Tensor, cfg: PerformanceConfig) -> torch.Tensor:
    """Images in the networks' memory format."""
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def compile_in_place(modules: list[nn.Module | None], cfg: PerformanceConfig, static: bool = True) -> None:
    """``torch.compile`` each module in place (``nn.Module.compile``), with static shapes, or with
    torch's automatic dynamic shapes (``static=False``: a dimension seen with a second size is
    compiled as dynamic) where the sizes change from step to step (EQ-VAE's transforms)."""
    for module in modules:
        if module is not None:
            module.compile(mode=cfg.compile_mode, dynamic=False if static else None)


def compiled_parts(vae: Autoencoder) -> list[nn.Module]:
    """The autoencoder's parts that are compiled: encoder and decoder, whose forward is all tensors
    (the autoencoder's own forward returns a distribution object)."""
    return [vae.encoder, vae.decoder]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, steps: int, warmup: int, device: torch.device, *args) -> float:
    """Wall seconds per call of ``fn(*args)`` over ``steps`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn(*args)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn(*args)
    synchronize(device)
    return (time.perf_counter() - start) / steps


class _GlobalOnly(contextlib.nullcontext):
    """Stands in for FlopCounterMode's per-module tracker, whose backward hooks break
    ``torch.autograd.grad`` (the adaptive GAN weight): every count goes to the total."""

    parents = ("Global",)


def cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU kernel of ``scaled_dot_product_attention`` (shapes in), which torch's counter does not
    know: those of its GPU kernels."""
    return sdpa_flop_count(query, key, value)


def cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of that kernel's backward, as torch counts its GPU kernels' backward."""
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch.utils.flop_counter counts the GPU attention kernels only: on the CPU every attention (the VAE's mid-block,
# DINOv2, the DiT) would count 0.
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops}


def count_flops(step, *args) -> float:
    """FLOPs of one call of ``step`` (2 per multiply-add), counted on eager modules, attention included on the
    CPU too (:data:`CPU_ATTENTION`)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        step(*args)
    return float(counter.get_total_flops())
