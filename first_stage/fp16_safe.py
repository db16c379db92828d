"""The fp16-safe fine-tune: a VAE whose activations overflow fp16 (the SDXL VAE's black images) is fine-tuned
so that every activation stays under fp16's range with margin while its fp32 outputs and latents stay put.

madebyollin's sdxl-vae-fp16-fix (its README) fine-tuned the SDXL VAE "to: 1. keep the final output the same,
but 2. make the internal activation values smaller, by 3. scaling down weights and biases within the network".
Here, with ``teacher.path`` the VAE's own fp32 original (``first_stage.teacher``: its decoding of the same
latent and its posterior means are the targets, points 1 and the encoder's latents), this term is point 2::

    penalty = activation_weight * sum over module outputs a of  sum_reduce(relu(|a| / limit - 1)^2)

over every module of the trained VAE whose output is a floating tensor (the set the export's fp16 audit,
``first_stage.export.fp16_overflow_check``, watches), each tensor once, in ``loss.reduction``
(``first_stage.regularizers.sum_reduce``). Point 3 is :func:`rescale_groupnorm_fed` where it is exact: a
convolution whose only consumer is a GroupNorm (a ResnetBlock2D's conv1, read by norm2) may be scaled down
freely, since GroupNorm divides the scale out again (exactly but for its eps), so ``fp16_safe.rescale`` does
that before the first step; the rest (the residual stream, attention) is left to the penalty.

The activations are recorded by forward hooks on the raw VAE, so the term works under DDP; it does not run
under ``torch.compile`` (its hooks append to Python lists mid-graph), which the check at load refuses.
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from .config import Config, ConfigError
from .data import calibration_batches
from .loss_term import LossContext, LossTerm, refuse_below
from .model import FP16_MAX, decode_latent, encode_latent, preset_class
from .teacher import TEACHER_STANDIN

# rescale: a GroupNorm-fed convolution is brought to this fraction of fp16_safe.limit on the probe batch (one
# power of two under the penalty's hinge, so the penalty starts at zero there; the package's choice).
RESCALE_TARGET = 0.5


def _at_least_fp32(a: torch.Tensor) -> torch.Tensor:
    return a.to(torch.promote_types(a.dtype, torch.float32))


class _Excess(torch.autograd.Function):
    """sum(relu(|a| / limit - 1)^2), in fp32 at least. Written out, autograd would keep an fp32 copy of every
    activation for the backward (the relu's output); this keeps ``a`` itself, which its consumer mostly keeps."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, limit: float) -> torch.Tensor:
        ctx.save_for_backward(a)
        ctx.limit = limit
        return torch.relu(_at_least_fp32(a).abs() / limit - 1).square().sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (a,) = ctx.saved_tensors
        wide = _at_least_fp32(a)
        slope = 2 * torch.relu(wide.abs() / ctx.limit - 1) * wide.sign() / ctx.limit  # d/da of the excess²
        return (grad * slope).to(a.dtype), None


def activation_excess(a: torch.Tensor, limit: float, reduction: str) -> torch.Tensor:
    """relu(|a| / limit - 1)^2 of a (B, ...) tensor, summed over all but the batch and averaged over it
    (``"sum"``) or averaged over every element (``"mean"``), as ``regularizers.sum_reduce``; fp32."""
    total = _Excess.apply(a, limit)
    return total / (a.shape[0] if reduction == "sum" else a.numel())


class ActivationRecorder:
    """The hooks' store for one forward pass made with grad enabled: each module output's excess (a graph
    tensor) and peak |a| (detached), every tensor once (a container returns its last child's output).
    ``arm`` runs before each forward pass (a pre-hook on the encoder) and ``clear`` after the loss takes the
    records, which disarms it: a pass whose loss was never taken leaves nothing for the next step, and what a
    gradient-checkpointed backward recomputes (the hooks fire again then) is neither recorded nor kept alive."""

    def __init__(self, limit: float, reduction: str):
        self.limit, self.reduction = limit, reduction
        self.excess: list[torch.Tensor] = []
        self.peaks: list[torch.Tensor] = []
        self.seen: dict[int, torch.Tensor] = {}  # id → the tensor, held so that no id is reused mid-pass
        self.armed = False

    def arm(self, *_) -> None:
        self.clear()
        self.armed = True

    def clear(self, *_) -> None:
        self.excess, self.peaks, self.seen, self.armed = [], [], {}, False

    def record(self, module: nn.Module, args, output) -> None:
        """Forward hook: note the excess and peak of each floating tensor ``module`` returns."""
        if not (self.armed and torch.is_grad_enabled()):
            return
        for out in output if isinstance(output, (tuple, list)) else (output,):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point() or id(out) in self.seen:
                continue
            self.seen[id(out)] = out
            low, high = torch.aminmax(out.detach())
            self.peaks.append(torch.maximum(-low, high).float())
            if out.requires_grad:
                self.excess.append(activation_excess(out, self.limit, self.reduction))


def _note_peak(peaks: dict[str, float], name: str, module: nn.Module, args, output: torch.Tensor) -> None:
    """Forward hook: the largest fp32 |output| of ``name`` so far, into ``peaks``."""
    peaks[name] = max(peaks[name], output.detach().float().abs().max().item())


def groupnorm_fed_convs(vae: nn.Module) -> dict[str, nn.Conv2d]:
    """The trained convolutions whose only consumer is a GroupNorm, by name: the conv1 of each diffusers
    ResnetBlock2D without a time embedding (its output goes to norm2 alone)."""
    return {f"{name}.conv1": block.conv1 for name, block in vae.named_modules()
            if isinstance(block, ResnetBlock2D) and block.time_emb_proj is None
            and type(block.norm2) is nn.GroupNorm and block.conv1.weight.requires_grad}


@torch.no_grad()
def rescale_groupnorm_fed(vae: nn.Module, x: torch.Tensor, target: float) -> dict[str, float]:
    """Scale down, weight and bias alike, each of :func:`groupnorm_fed_convs` whose fp32 peak |output| on
    images ``x`` (B,3,H,W) exceeds ``target``, to ``target``. GroupNorm(s·y) = GroupNorm(y) but for its eps
    (``var + eps`` becomes ``var + eps / s²``), so the VAE's outputs and latents do not move. Returns the
    factor of each convolution scaled, by name."""
    convs = groupnorm_fed_convs(vae)
    peaks = dict.fromkeys(convs, 0.0)
    handles = [conv.register_forward_hook(functools.partial(_note_peak, peaks, name)) for name, conv in convs.items()]
    was_training = vae.training
    try:
        vae.eval()
        decode_latent(vae, encode_latent(vae, x))
    finally:
        vae.train(was_training)
        for handle in handles:
            handle.remove()
    factors = {name: target / peak for name, peak in peaks.items() if peak > target}
    for name, factor in factors.items():
        convs[name].weight.mul_(factor)
        if convs[name].bias is not None:
            convs[name].bias.mul_(factor)
    return factors


def probe_batch(config: Config, device: torch.device) -> torch.Tensor:
    """The images the rescale measures on: ``train.batch_size`` centre crops picked (seeded by ``train.seed``)
    from ``data``, the same on every process, (B,3,R,R)."""
    batch = next(calibration_batches(config.data, config.train.batch_size, config.train.batch_size,
                                     seed=config.train.seed))
    return batch["pixel_values"].to(device)


class Fp16SafeTerm(LossTerm):
    """The activation penalty of the fp16-safe fine-tune (module docstring); the teacher term holds the
    outputs and latents. :meth:`build` rescales (``fp16_safe.rescale``) and hooks the trained VAE."""

    name, section = "fp16_safe", "fp16_safe"
    # The fp16-safe step: the hooks, the penalty and the teacher's decode and encode, started from and taught by
    # bench_train's stand-in VAE (TEACHER_STANDIN: the recipe's model saved fresh; quoted, as YAML reserves "@").
    bench_rows = {"fp16_safe": ["fp16_safe.enabled=true", f"model.init_from='{TEACHER_STANDIN}'",
                                f"teacher.path='{TEACHER_STANDIN}'", "teacher.latent_weight=1"]}

    def __init__(self, config: Config):
        super().__init__(config)
        self.recorder = ActivationRecorder(config.fp16_safe.limit, config.loss.reduction)
        self.rescaled: dict[str, float] | None = None  # known once built

    @classmethod
    def check(cls, config: Config) -> None:
        f = config.fp16_safe
        if not f.enabled:
            return
        if config.teacher.path is None:
            raise ConfigError("fp16_safe.enabled needs teacher.path: the VAE's own fp32 original (the source "
                              "model.init_from names), whose outputs and latents the fine-tune holds")
        if config.teacher.output_weight <= 0:
            raise ConfigError(f"fp16_safe.enabled needs teacher.output_weight > 0 (the outputs held), got "
                              f"{config.teacher.output_weight}")
        refuse_below(config, 0, "fp16_safe.activation_weight")
        if not 0 < f.limit <= FP16_MAX:
            raise ConfigError(f"fp16_safe.limit must be in (0, {FP16_MAX:g}] (fp16's largest value), got {f.limit}")
        if preset_class(config.model.preset) == "AutoencoderTiny":
            raise ConfigError(f"fp16_safe.enabled with model.preset {config.model.preset}: an AutoencoderTiny "
                              "trains only as a distillation student (its decoder runs before its encoder)")
        if config.performance.compile:
            raise ConfigError("fp16_safe.enabled does not run under performance.compile (its forward hooks record "
                              "every activation); set performance.compile=false")

    def build(self, vae, device: torch.device) -> None:
        f = self.config.fp16_safe
        self.rescaled = {}
        if f.rescale:
            self.rescaled = rescale_groupnorm_fed(vae, probe_batch(self.config, device), RESCALE_TARGET * f.limit)
        vae.encoder.register_forward_pre_hook(self.recorder.arm)  # every forward pass encodes first
        for name, module in vae.named_modules():
            if name:
                module.register_forward_hook(self.recorder.record)
        return None

    def loss(self, out, ctx: LossContext) -> tuple[torch.Tensor | None, dict]:
        recorder = self.recorder
        if not recorder.peaks:  # a forward pass made without grad
            return None, {}
        logs = {"train/fp16_peak": torch.stack(recorder.peaks).max().item()}
        value = None
        if recorder.excess:
            penalty = torch.stack(recorder.excess).sum()
            value = self.config.fp16_safe.activation_weight * penalty
            logs["train/loss/fp16_excess"] = penalty.item()
        recorder.clear()
        return value, logs

    def card_line(self) -> str:
        f, reduction = self.config.fp16_safe, self.config.loss.reduction
        if not f.rescale:
            rescaled = "no rescaling"
        elif self.rescaled is None:
            rescaled = "GroupNorm-fed convolutions rescaled first (count not recorded)"
        else:
            rescaled = f"{len(self.rescaled)} GroupNorm-fed convolution(s) rescaled first, function-preserving"
        return (f"fp16-safe fine-tune (sdxl-vae-fp16-fix's idea): {f.activation_weight:g} × relu(|a| / {f.limit:g} "
                f"− 1)² over every activation a of the VAE ({reduction} reduction), outputs and latents held by "
                f"the teacher {self.config.teacher.path}; {rescaled}")
