"""The PatchGAN discriminator of pix2pix / taming-transformers, and its losses."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, ConfigError, DiscriminatorConfig
from .convert import LDM_DISCRIMINATOR_PREFIX, read_weights, split_ldm_checkpoint
from .loss_term import LossContext, LossTerm, adaptive_weight, mean_unit, refuse_below


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """``n_layers`` strided 4x4 convolutions; outputs one logit per overlapping patch, (B,1,h,w).

    With the defaults (3 layers, 64 channels) each logit sees a 70x70 receptive field.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        bias = norm == "none"  # a norm layer right after makes a conv bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=bias),
                _norm(norm, channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    """The pix2pix initialisation: N(0, 0.02) convolutions, N(1, 0.02) norm scales."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_discriminator(cfg: DiscriminatorConfig) -> PatchDiscriminator:
    return PatchDiscriminator(channels=cfg.channels, n_layers=cfg.n_layers, norm=cfg.norm)


def discriminator_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Discriminator weights from an export's ``discriminator.safetensors`` or from a latent-diffusion
    autoencoder checkpoint (its ``loss.discriminator.*``: the same layer layout as ours)."""
    state, _ = read_weights(path)
    if any(k.startswith(LDM_DISCRIMINATOR_PREFIX) for k in state):
        state = split_ldm_checkpoint(state)[1]
    if not any(k.startswith("main.") for k in state):
        raise ValueError(f"discriminator.init_from: {path} holds no discriminator weights (keys 'main.N.*')")
    return state


def infer_discriminator_config(state: dict[str, torch.Tensor]) -> dict:
    """``n_layers``, ``channels`` and ``norm`` of a PatchGAN from its weights."""
    convs = sorted(int(k.split(".")[1]) for k, v in state.items() if k.endswith(".weight") and v.ndim == 4)
    norm = ("batch" if any(k.endswith("running_mean") for k in state)
            else "none" if f"main.{convs[1]}.bias" in state else "group")
    return {"n_layers": len(convs) - 2, "channels": state["main.0.weight"].shape[0], "norm": norm}


def load_discriminator(discriminator: PatchDiscriminator, path: str | Path) -> None:
    """Load :func:`discriminator_state` into ``discriminator``; a mismatch names the settings to fix."""
    state = discriminator_state(path)
    try:
        discriminator.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"discriminator.init_from: {path} does not fit this discriminator; its weights say "
                         f"{infer_discriminator_config(state)} (set discriminator.n_layers/channels/norm)") from err


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's loss on real and (detached) fake logits, in fp32."""
    real, fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    if kind == "non_saturating":
        return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    raise ValueError(f"discriminator.loss must be 'hinge' or 'non_saturating', got {kind!r}")


def generator_adversarial_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's adversarial term: ``-mean(D(x̂))`` (hinge, as latent-diffusion) or
    ``mean(softplus(-D(x̂)))`` (non-saturating)."""
    fake = logits_fake.float()
    if kind == "hinge":
        return -fake.mean()
    if kind == "non_saturating":
        return F.softplus(-fake).mean()
    raise ValueError(f"discriminator.loss must be 'hinge' or 'non_saturating', got {kind!r}")


def discriminator_side(cfg: DiscriminatorConfig) -> int:
    """The smallest image side the PatchGAN takes: 3·2^n_layers (its strided 4x4 convolutions)."""
    return 3 * 2 ** cfg.n_layers


class GANTerm(LossTerm):
    """The adversarial term of the generator: ``weight · a · g_loss`` from step ``start +
    warmup_steps``, with ``a`` the adaptive weight against the NLL at the decoder's last layer. The
    discriminator's own step is the trainer's (``trainer.micro_step``)."""

    name, section = "gan", "discriminator"
    # no row of its own: bench_train's plain step (--loss full) has the GAN on from step 0

    @classmethod
    def check(cls, config: Config) -> None:
        d = config.discriminator
        refuse_below(config, 0, "discriminator.start", "discriminator.warmup_steps", "discriminator.pretrain_steps",
                     "discriminator.weight", "discriminator.adaptive_weight_max")
        if d.pretrain_steps and not (d.enabled and d.start == 0):
            raise ConfigError("discriminator.pretrain_steps: the pre-training trains the discriminator from step 0; "
                              "set discriminator.enabled=true and discriminator.start=0")
        refuse_below(config, 1, "discriminator.n_layers", "discriminator.channels")
        if d.enabled and config.data.resolution < discriminator_side(d):
            raise ConfigError(f"discriminator.n_layers: a {d.n_layers}-layer PatchGAN takes images of at least "
                              f"{discriminator_side(d)} pixels, data.resolution is {config.data.resolution}")

    def active(self, step: int) -> bool:
        """Whether the adversarial term reaches the generator at ``step`` (never during the pre-training)."""
        d = self.config.discriminator
        return step >= max(d.start + d.warmup_steps, d.pretrain_steps)

    def loss(self, out, ctx: LossContext) -> tuple[torch.Tensor | None, dict]:
        if not self.active(ctx.step):
            return None, {}
        d = self.config.discriminator
        if ctx.discriminator is None or ctx.last_layer is None:
            raise ValueError("the GAN term is active: pass the discriminator and the decoder's last layer")
        g_loss = generator_adversarial_loss(ctx.discriminator(out.reconstruction), d.loss)
        d_weight = (d.weight * adaptive_weight(ctx.nll, g_loss, ctx.last_layer, d.adaptive_weight_max)
                    if d.adaptive else d.weight * mean_unit(self.config, out.target))  # REPA-E's 0.1: against a mean
        return d_weight * g_loss, {"train/loss/g": g_loss.item(), "train/d_weight": float(d_weight)}

    def card_line(self) -> str:
        d = self.config.discriminator
        first = max(d.start + d.warmup_steps, d.pretrain_steps)
        ramp = f", reaching the generator from step {first}" if first > d.start else ""
        if d.pretrain_steps:
            ramp += f" (steps 0-{d.pretrain_steps - 1}: the discriminator alone, against the frozen VAE)"
        return (f"PatchGAN ({d.n_layers} layers, {d.norm} norm, {d.loss} loss) from step {d.start}{ramp}, "
                f"weight {d.weight:g}" + (f" × the adaptive weight (max {d.adaptive_weight_max:g})" if d.adaptive
                                          else " (fixed, against a per-element mean NLL; no adaptive weight)"))
