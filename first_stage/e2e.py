"""End-to-end tuning of a VAE against a latent diffusion transformer: REPA-E (End2End-Diffusion/REPA-E,
``train_repae.py``, ``models/sit.py``), under this package's trainer (docs/e2e.md).

A step, as :func:`first_stage.trainer.micro_step` runs it with section ``e2e`` on:

1. the vision model's patch tokens of the batch, without a graph (:meth:`E2ETerm.vision_tokens`);
2. **VAE step**: the generator loss plus ``align_weight`` × the REPA loss of an *align pass*: the
   transformer's parameters frozen and its latent BatchNorm in eval mode, so the alignment gradient
   flows transformer → BatchNorm → latent → encoder and nothing of the transformer moves
   (:meth:`E2ETerm.loss`); then the discriminator's step on detached images, as in every run;
3. **transformer step** on the *detached* latent, so the diffusion loss never reaches the VAE: the
   flow-matching loss plus ``proj_coeff`` × its REPA loss, with the t and noise of the align pass
   (:meth:`E2ETerm.transformer_loss`); its own AdamW, GradScaler and clipping, then the EMA of the
   transformer, BatchNorm buffers included (:func:`ema_update`).

The latent BatchNorm (:class:`LatentBatchNorm`: affine off, eps 1e-4, momentum 0.1) is the transformer's
first layer, started from per-channel statistics measured before the first step (``e2e.bn_init_images``
images, ``trainer.e2e_measure``; REPA-E measures its dataset beforehand), updated only by the transformer
step, its statistics reduced over every process (REPA-E's SyncBN); the EMA transformer's buffers are the
tuned VAE's exported normaliser. For an
``AutoencoderKLFlux2`` the transformer reads the 2×2 patches its own BatchNorm normalises, so the buffers
are its ``bn.*``.

Every draw (t, noise) is a function of (seed, step, the image's place in the global batch): one process
and several, with or without accumulation, train alike. BatchNorm and both loss normalisations run in
fp32 with autocast off (REPA #46: NaN in ``F.normalize`` under fp16).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from .alignment import FoundationFeatures, load_foundation_model
from .config import Config, ConfigError, E2EConfig
from .dit import DIT_NAMES, DIT_SIZES, ProbeDiT, dit_patch, repa_loss, repa_projector
from .latent_norm import LatentNormalizer
from .loss_term import LossContext, LossTerm, StepDraw, mean_unit, refuse_below
from .model import DTYPES, ForwardPlan, downsampling_factor, is_tiny

TRANSFORMER_FILE = "e2e_transformer.safetensors"  # in an export's finetune/ bundle: the raw transformer
TRANSFORMER_EMA_FILE = "e2e_transformer_ema.safetensors"  # and its EMA (the exported normaliser's source)
_DRAW_TAG = 0xE2E  # keeps the t and noise draws apart from the posterior's, which hash (seed, step, image)
E2E_MEASURE_TAG = 0xE2F  # the posterior samples that measure the BatchNorm's starting statistics


class LatentBatchNorm(nn.Module):
    """REPA-E's latent ``BatchNorm2d(affine=False)``, in fp32 with autocast off, its training statistics
    summed over every process (SyncBN's, on the CPU too). Buffers and state-dict keys are
    ``BatchNorm2d``'s. In train mode the statistics are not differentiated: the transformer step's input
    is detached, and a latent with a graph is refused."""

    def __init__(self, channels: int, eps: float = 1e-4, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @staticmethod
    def sums(z: torch.Tensor) -> torch.Tensor:
        """(count, Σz per channel, Σz² per channel) of ``z`` (B, C, h, w), float64: what :meth:`moments` reduces."""
        return torch.cat([torch.tensor([z[:, 0].numel()], dtype=torch.float64, device=z.device),
                          z.double().sum((0, 2, 3)), z.double().pow(2).sum((0, 2, 3))])

    @staticmethod
    def moments(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mean, biased variance) per channel, float64, and the number of values per channel, of :meth:`sums`
        added over every process (every process must call it)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sums = sums.clone()
            dist.all_reduce(sums)
        n = sums[0]
        c = (len(sums) - 1) // 2
        mean = sums[1:1 + c] / n.clamp(min=1)
        return mean, (sums[1 + c:] / n.clamp(min=1) - mean.pow(2)).clamp(min=0), int(n.item())

    @torch.no_grad()
    def start_from(self, sums: torch.Tensor) -> None:
        """Set the running statistics to the measured ones of :meth:`sums` (over every process): REPA-E's
        ``init_bn`` from the VAE's latent statistics (the variance unbiased, as the running one)."""
        mean, var, n = self.moments(sums)
        if n < 2:
            raise ValueError("the latent BatchNorm's statistics need at least 2 values per channel")
        self.running_mean.copy_(mean)
        self.running_var.copy_(var * n / (n - 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            if self.training:
                if z.requires_grad:
                    raise RuntimeError("LatentBatchNorm in train mode takes a detached latent (the transformer "
                                       "step's); the align pass runs it in eval mode")
                mean, var, n = self.moments(self.sums(z))
                with torch.no_grad():  # torch's BatchNorm: the running variance is the unbiased one
                    self.running_mean.lerp_(mean.float(), self.momentum)
                    self.running_var.lerp_((var * n / max(n - 1, 1)).float(), self.momentum)
                    self.num_batches_tracked += 1
                mean, var = mean.float(), var.float()
            else:
                mean, var = self.running_mean, self.running_var
            return (z - mean.view(1, -1, 1, 1)) * (var.view(1, -1, 1, 1) + self.eps).rsqrt()


def interpolant(t: torch.Tensor, path: str) -> tuple[torch.Tensor, ...]:
    """(alpha_t, sigma_t, d alpha_t/dt, d sigma_t/dt) of REPA-E's paths, ``t`` (B, 1, 1, 1):
    linear x_t = (1 − t)x + tε; cosine x_t = cos(πt/2)x + sin(πt/2)ε."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    half = math.pi / 2
    return torch.cos(t * half), torch.sin(t * half), -half * torch.sin(t * half), half * torch.cos(t * half)


class E2ETransformer(nn.Module):
    """The diffusion transformer of end-to-end tuning: the latent BatchNorm, a DiT/SiT
    (:class:`first_stage.dit.ProbeDiT`, unconditional, time embedded as SiT does: t in [0, 1]) and
    REPA's projector, an MLP (hidden → projector_dim → projector_dim → the vision model's width,
    SiLU) on the tokens after block ``encoder_depth``."""

    def __init__(self, channels: int, side: int, cfg: E2EConfig, feature_dim: int):
        super().__init__()
        size = DIT_SIZES[cfg.transformer]
        self.encoder_depth, self.path = cfg.encoder_depth, cfg.path
        self.bn = LatentBatchNorm(channels, cfg.bn_eps, cfg.bn_momentum)
        self.dit = ProbeDiT(channels, side, patch=cfg.patch or dit_patch(side), **size)
        self.projector = repa_projector(size["hidden"], cfg.projector_dim, feature_dim)

    def forward(self, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, align_only: bool = False
                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(predicted velocity or None under ``align_only``, its target, projected tokens (B, N, D)) for
        latents ``z`` (B, C, h, w) in the transformer's layout, times ``t`` (B,) and noise like ``z``."""
        x = self.bn(z)
        alpha, sigma, d_alpha, d_sigma = interpolant(t.view(-1, 1, 1, 1).float(), self.path)
        x_t, target = alpha * x + sigma * noise, d_alpha * x + d_sigma * noise
        prediction, tokens = self.dit.run(x_t, t, features_at=self.encoder_depth, stop=align_only)
        return prediction, target, self.projector(tokens)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """REPA-E's ``update_ema``: ema ← d·ema + (1 − d)·model for parameters and float buffers (the
    BatchNorm's running statistics), integer buffers copied; no warm-up. ``decay`` 0 copies."""
    params = list(ema.parameters())
    if params:
        torch._foreach_lerp_(params, [p.detach() for p in model.parameters()], 1 - decay)
    for mine, theirs in zip(ema.buffers(), model.buffers()):
        if mine.is_floating_point():
            mine.lerp_(theirs, 1 - decay)
        else:
            mine.copy_(theirs)


@dataclass
class DiffusionDraw:
    """One micro-batch's draws for the transformer, shared by the align pass and the transformer step
    (REPA-E reuses them), and the vision model's tokens of its images once computed."""

    t: torch.Tensor  # (n,)
    noise: torch.Tensor  # (n, C', h', w'): the transformer's layout
    tokens: torch.Tensor | None = None  # (n, N, D)


def check_e2e(config: Config) -> None:
    """Range and cross-section checks of section ``e2e``, naming the key."""
    e = config.e2e
    refuse_below(config, 0, "e2e.align_weight", "e2e.proj_coeff", "e2e.lr", "e2e.weight_decay", "e2e.bn_init_images")
    refuse_below(config, 1, "e2e.encoder_depth", "e2e.projector_dim", "e2e.patch")
    depth = DIT_SIZES[e.transformer]["depth"]
    if e.encoder_depth > depth:
        raise ConfigError(f"e2e.encoder_depth: {e.encoder_depth} is deeper than the {DIT_NAMES[e.transformer]} "
                          f"transformer's {depth} blocks (e2e.transformer={e.transformer})")
    if not 0 <= e.ema_decay <= 1:
        raise ConfigError(f"e2e.ema_decay must be in [0, 1], got {e.ema_decay}")
    if not 0 < e.bn_momentum <= 1 or e.bn_eps <= 0:
        raise ConfigError(f"e2e.bn_momentum must be in (0, 1] and e2e.bn_eps > 0, got {e.bn_momentum}, {e.bn_eps}")
    if e.grad_clip is not None and e.grad_clip <= 0:
        raise ConfigError(f"e2e.grad_clip must be > 0 (or null: no clipping), got {e.grad_clip}")
    if not e.enabled:
        return
    if config.model.trainable != "all":
        raise ConfigError("e2e.enabled needs model.trainable: all (the alignment gradient trains the encoder)")
    if config.teacher.path is not None:
        raise ConfigError("e2e.enabled with teacher.path: end-to-end tuning moves the VAE's own latents; "
                          "distil first, then tune the result")
    if config.equivariance.enabled and config.equivariance.lowres_probability > 0:
        raise ConfigError("equivariance.lowres_probability: its low-resolution steps make smaller latents than the "
                          "e2e transformer's grid; set it to 0 with e2e.enabled")


class E2ETerm(LossTerm):
    """REPA-E's alignment of the VAE step as a loss-term unit: ``align_weight`` × the REPA loss of the
    align pass. :meth:`build` loads the vision model and builds the transformer and its EMA (held here
    until ``trainer.build_parts`` takes them into ``TrainingParts``); :meth:`transformer_loss` is the
    transformer step's loss, which the trainer backpropagates into the transformer alone."""

    name, section = "e2e", "e2e"
    needs_vision_model = True
    bench_rows = {"e2e": ["e2e.enabled=true"]}
    study_variant = ("e2e", ["e2e.enabled=true"],
                     "REPA-E: tuned against a diffusion transformer (align pass through its frozen copy, "
                     "latent BatchNorm exported)")

    @classmethod
    def check(cls, config: Config) -> None:
        check_e2e(config)

    def build(self, vae, device: torch.device) -> None:
        cfg = self.config.e2e
        if is_tiny(vae):
            raise ConfigError("e2e.enabled: an AutoencoderTiny has no posterior to tune end to end")
        self.autocast = DTYPES.get(self.config.train.mixed_precision)  # None for "no"
        self.vision: FoundationFeatures = load_foundation_model(cfg.model, "latent", self.autocast).to(device)
        # the transformer reads the latent, or for a VAE with a FLUX.2 BatchNorm the 2×2 patches its bn normalises
        self.layout = LatentNormalizer.of(vae)
        side = self.config.data.resolution // downsampling_factor(vae.config)
        probe = self.layout.layout(torch.zeros(1, vae.config.latent_channels, side, side))
        self.channels, self.side = probe.shape[1], probe.shape[-1]
        self.patch = cfg.patch or dit_patch(self.side)
        if self.side % self.patch:
            raise ConfigError(f"e2e.patch: the transformer's {self.side}-wide latent at data.resolution="
                              f"{self.config.data.resolution} is not a multiple of its patch {self.patch}")
        with torch.random.fork_rng(devices=[]):  # its own initialisation, leaving the run's other draws alone
            torch.default_generator.manual_seed(self.config.train.seed + _DRAW_TAG)  # built on the CPU, then moved
            self.transformer = E2ETransformer(self.channels, self.side, cfg, self.vision.dim).to(device)
        if cfg.init_from is not None:
            load_transformer(self.transformer, cfg.init_from)
        self.ema = copy.deepcopy(self.transformer).requires_grad_(False)
        self.measured = False  # trainer.e2e_measure started the BatchNorm from e2e.bn_init_images images
        ema_file = Path(cfg.init_from).with_name(TRANSFORMER_EMA_FILE) if cfg.init_from else None
        self.ema_missing = ema_file is not None and not ema_file.is_file()  # the EMA starts as the transformer
        if ema_file is not None and not self.ema_missing:
            load_transformer(self.ema, str(ema_file))
        return None

    @torch.no_grad()
    def start_statistics(self, sums: torch.Tensor) -> None:
        """The BatchNorm's, and its EMA's, running statistics from :meth:`LatentBatchNorm.sums` of latents in the
        transformer's layout (over every process): REPA-E's ``init_bn``."""
        self.transformer.bn.start_from(sums)
        ema_update(self.ema, self.transformer, 0.0)

    @property
    def tokens_grid(self) -> tuple[int, int]:
        grid = self.side // self.patch
        return grid, grid

    def draw(self, draw: StepDraw) -> DiffusionDraw:
        """t and noise for this micro-batch's images, each from its own generator seeded by (seed, step,
        its place in the global batch): REPA-E's draws (``--weighting`` uniform or EDM's log-normal σ)."""
        cfg, ts, noises = self.config.e2e, [], []
        for i in range(draw.n):
            g = torch.Generator().manual_seed(hash((draw.seed, draw.step, draw.first + i, _DRAW_TAG)))
            if cfg.time_sampling == "uniform":
                t = torch.rand((), generator=g)
            else:
                sigma = torch.randn((), generator=g).exp()
                t = sigma / (1 + sigma) if cfg.path == "linear" else 2 / math.pi * torch.atan(sigma)
            ts.append(t)
            noises.append(torch.randn((self.channels, self.side, self.side), generator=g))
        return DiffusionDraw(torch.stack(ts).to(draw.device), torch.stack(noises).to(draw.device))

    def plan(self, plan: ForwardPlan, draw: StepDraw) -> None:
        plan.diffusion = self.draw(draw)

    def vision_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The vision model's patch tokens (B, N, D) on the transformer's token grid, as REPA-E's DINOv2
        sees the image: [0, 1], ImageNet mean and std, bicubic to 14 pixels per token."""
        features = self.vision(images, self.tokens_grid, normalize=True, interpolation="bicubic", antialias=False)
        return features.flatten(2).transpose(1, 2)

    def _run(self, transformer: nn.Module, z: torch.Tensor, plan: DiffusionDraw, align_only: bool):
        with torch.autocast(z.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            return transformer(self.layout.layout(z), plan.t, plan.noise, align_only)

    def loss(self, out, ctx: LossContext) -> tuple[torch.Tensor, dict]:
        plan = ctx.plan.diffusion
        if plan.tokens is None:
            plan.tokens = self.vision_tokens(out.inputs)
        raw = self.transformer
        was_training = raw.training
        raw.eval().requires_grad_(False)  # the align pass: frozen, BatchNorm on its running statistics
        try:
            _, _, projected = self._run(raw, out.z, plan, align_only=True)
        finally:
            raw.train(was_training).requires_grad_(True)
        align = repa_loss(projected, plan.tokens)
        weight = self.config.e2e.align_weight * mean_unit(self.config, out.target)  # REPA-E's 1.5 is against a mean
        return weight * align, {"train/e2e/vae_align": align.item()}

    def transformer_loss(self, transformer: nn.Module, z: torch.Tensor, plan: DiffusionDraw) -> tuple[torch.Tensor,
                                                                                                      dict]:
        """The transformer step's loss on the detached latent ``z``: flow matching + ``proj_coeff`` × REPA
        (``transformer`` is the DDP-wrapped one on several processes), the transformer in train mode."""
        transformer.train()
        prediction, target, projected = self._run(transformer, z.detach(), plan, align_only=False)
        with torch.autocast(z.device.type, enabled=False):
            denoise = (prediction.float() - target.float()).pow(2).mean()
        proj = repa_loss(projected, plan.tokens)
        return denoise + self.config.e2e.proj_coeff * proj, {"train/e2e/denoise": denoise.item(),
                                                              "train/e2e/proj": proj.item()}

    def card_line(self) -> str:
        e = self.config.e2e
        return (f"end-to-end with a {DIT_NAMES[e.transformer]} diffusion transformer (REPA-E): the VAE step adds "
                f"{e.align_weight:g} × REPA alignment at block {e.encoder_depth} to `{e.model}` tokens through the "
                f"frozen transformer; the transformer trains on the detached latents ({e.path} flow matching + "
                f"{e.proj_coeff:g} × REPA); the latent normalisation is its EMA BatchNorm's")


def load_transformer(transformer: nn.Module, path: str) -> None:
    """Weights of an export's ``finetune/e2e_transformer*.safetensors`` into ``transformer``, strictly;
    a missing file or other shapes are refused naming the file and the key to change."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"e2e.init_from: {file.resolve()} not found (an export's finetune/{TRANSFORMER_FILE})")
    try:
        transformer.load_state_dict(load_file(str(file)))
    except RuntimeError as err:
        raise ConfigError(f"e2e.init_from: {file} does not fit the transformer of this config (e2e.transformer, "
                          f"e2e.patch, e2e.projector_dim, the vision model's width): {str(err)[:300]}") from None
