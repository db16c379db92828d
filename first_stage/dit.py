"""The latent diffusion transformer shared by the diffusability probe (first_stage.diffusability) and
end-to-end tuning (first_stage.e2e): DiT/SiT-style adaLN-zero blocks on patches of 1 or 2 latent pixels.

Written here rather than taken from diffusers: its ``DiTTransformer2DModel`` needs class labels (no
unconditional mode), replaces 10 % of them by the null class during training with torch's global
generator (so draws would no longer be a function of a seed and the sample, and would differ with the
process count), gives every block its own timestep and label embedders (so its DiT-B is not the DiT-B
people quote), and does not expose the tokens after a given block, which REPA reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding
from torch import nn

FREQUENCIES = 256  # width of the sinusoidal timestep embedding (DiT's and SiT's)
# hidden width, depth, heads: DiT/SiT's S, B, L, XL (LightningDiT-B's width/depth/heads are B's); tiny for tests
DIT_SIZES = {
    "tiny": {"hidden": 64, "depth": 2, "heads": 4},
    "small": {"hidden": 384, "depth": 12, "heads": 6},  # DiT-S
    "base": {"hidden": 768, "depth": 12, "heads": 12},  # DiT-B
    "large": {"hidden": 1024, "depth": 24, "heads": 16},  # DiT-L
    "xlarge": {"hidden": 1152, "depth": 28, "heads": 16},  # DiT-XL (REPA-E's SiT-XL)
}
DIT_NAMES = {"tiny": "DiT-tiny", "small": "DiT-S", "base": "DiT-B", "large": "DiT-L", "xlarge": "DiT-XL"}


class DiTBlock(nn.Module):
    """One adaLN-zero transformer block (DiT): attention and MLP, each on a LayerNorm shifted and scaled
    by the conditioning and gated by it, the gates initialised to zero so the block starts as identity."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * hidden, hidden))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens ``x`` (B, N, D) under conditioning ``c`` (B, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(6, dim=-1)  # (B, 1, D)
        b, n, d = x.shape
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, D/H)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate1 * self.proj(attended)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class ProbeDiT(nn.Module):
    """A latent diffusion transformer as DiT, SiT and LightningDiT build it: patches of ``patch`` latent
    pixels embedded by a strided convolution plus fixed 2-D sin-cos positions, adaLN-zero blocks
    conditioned on a sinusoidal embedding of the time it is given (the probe passes t · 1000, SiT t) plus, with
    ``num_classes``, a class embedding; a modulated LayerNorm and a zero-initialised linear layer back
    to patches. The velocity has the input's shape. :meth:`run` also returns the tokens after a given block
    (REPA's projector reads them) and can stop there."""

    def __init__(self, channels: int, side: int, hidden: int, depth: int, heads: int, patch: int,
                 num_classes: int = 0):
        super().__init__()
        if side % patch or hidden % 4 or hidden % heads:
            raise ValueError(f"a DiT needs a latent side divisible by its patch {patch} (got {side}) "
                             f"and a width divisible by 4 and its heads (got {hidden}, {heads} heads)")
        self.patch, self.num_classes = patch, num_classes
        grid = side // patch
        self.embed = nn.Conv2d(channels, hidden, patch, stride=patch)
        position = get_2d_sincos_pos_embed(hidden, grid, base_size=grid, output_type="pt").float()
        self.register_buffer("position", position[None], persistent=False)  # (1, N, D), fixed
        self.time = nn.Sequential(nn.Linear(FREQUENCIES, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label = nn.Embedding(num_classes, hidden) if num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out = nn.Linear(hidden, patch * patch * channels)
        self._initialise()

    def _initialise(self) -> None:
        """DiT's initialisation: Xavier for linear layers and the patch embedding, N(0, 0.02) for the
        embedders, zero for every modulation and the output layer (each block starts as identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.embed.weight.view(self.embed.weight.shape[0], -1))
        nn.init.zeros_(self.embed.bias)
        for layer in (self.time[0], self.time[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.label is not None:
            nn.init.normal_(self.label.weight, std=0.02)
        for last in [block.modulation[1] for block in self.blocks] + [self.final_modulation[1], self.out]:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity (B, C, h, w) at latents ``x`` (B, C, h, w) and times ``t`` (B,) as the embedding takes them."""
        return self.run(x, t, class_labels)[0]

    def run(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None, features_at: int = 0,
            stop: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(velocity, tokens (B, N, D) after block ``features_at``, or None when it is 0). ``stop``: return
        after that block, without the velocity (REPA-E's ``align_only``)."""
        b, c, h, w = x.shape
        p = self.patch
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.position  # (B, N, D)
        frequencies = get_timestep_embedding(t, FREQUENCIES, flip_sin_to_cos=True, downscale_freq_shift=0)
        cond = self.time(frequencies.to(tokens.dtype))  # (B, D)
        if self.label is not None:
            cond = cond + self.label(class_labels)
        features = None
        for depth, block in enumerate(self.blocks, 1):
            tokens = block(tokens, cond)
            if depth == features_at:
                features = tokens
                if stop:
                    return None, features
        shift, scale = self.final_modulation(cond)[:, None].chunk(2, dim=-1)
        out = self.out(self.norm(tokens) * (1 + scale) + shift)  # (B, N, p·p·C)
        return out.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w), features


def dit_patch(side: int) -> int:
    """The DiT probe's patch: 2 for latents wider than 16 (DiT on f8 latents: 32² → 16² tokens), else 1
    (LightningDiT on f16 latents: 16² tokens)."""
    return 2 if side > 16 and side % 2 == 0 else 1


def repa_projector(hidden: int, width: int, out: int) -> nn.Sequential:
    """REPA's projector (``build_mlp`` of REPA and REPA-E): hidden → width → width → out, SiLU between, Xavier
    weights and zero biases (SiT's ``initialize_weights``)."""
    projector = nn.Sequential(nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                              nn.Linear(width, out))
    for layer in projector[::2]:
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return projector


def repa_loss(projected: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """REPA's loss, fp32 with autocast off (REPA #46): the mean over images and tokens of −cos(projected, the
    vision model's token at the same place), both (B, N, D)."""
    with torch.autocast(projected.device.type, enabled=False):
        return -(F.normalize(projected.float(), dim=-1) * F.normalize(tokens.float(), dim=-1)).sum(-1).mean()
