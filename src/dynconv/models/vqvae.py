"""VQ-VAE stage 1 (van den Oord et al. 2017), laid out as Sonnet's VQ-VAE example.

Encoder: two 4x4 stride-2 convs -> 3x3 conv -> residual stack -> 1x1 conv to the embedding
dim; an EMA codebook quantises each latent vector; decoder: 3x3 conv -> residual stack ->
two x2 upsamplings. Its ``nn.Conv2d`` layers can be turned into dynamic ones with
:func:`dynconv.convert`; transposed convs are not converted, so ``upsample='nearest'`` or
``'pixel_shuffle'`` (a x2 upsampling followed by a 3x3 ``nn.Conv2d``) gives the decoder
convertible convs up to the output resolution.

Module names (with ``residual_layers=2``; ``up`` = ``'nearest'`` / ``'pixel_shuffle'``)::

    encoder.conv1                    4x4 stride 2, image -> hidden/2       H/2
    encoder.conv2                    4x4 stride 2, hidden/2 -> hidden      H/4
    encoder.conv3                    3x3, hidden -> hidden                 H/4
    encoder.residual.layers.{0,1}    .conv1 3x3 hidden -> residual, .conv2 1x1 back   H/4
    pre_quantization                 1x1, hidden -> embedding_dim          H/4
    decoder.conv1                    3x3, embedding_dim -> hidden          H/4
    decoder.residual.layers.{0,1}    as the encoder's                      H/4
    decoder.deconv1, decoder.deconv2 (transposed) 4x4 stride-2 transposed convs to H/2 and H
    decoder.upsample1.conv           (up) x2, then 3x3 hidden -> hidden/2  H/2
    decoder.upsample2.conv           (up) x2, then 3x3 hidden/2 -> image   H (the highest resolution)

:data:`INCLUDE_4_PLUS_4` selects 4 convs of the encoder and 4 of the decoder (the switched-conv
VQ-VAE study, ``configs/studies/vqvae.yaml``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._checks import choice, float_input, positive_int
from .registry import register_model

#: how the decoder doubles the resolution twice: ``'transposed'`` (4x4 stride-2 transposed
#: convs, Sonnet's layout), ``'nearest'`` (nearest-neighbour x2, then a 3x3 conv) or
#: ``'pixel_shuffle'`` (pixel shuffle x2, a quarter of the channels, then a 3x3 conv)
UPSAMPLING = ("transposed", "nearest", "pixel_shuffle")

#: ``convert.include`` globs for "4 convs in the encoder, 4 in the decoder" of a VQ-VAE with
#: ``residual_layers=2`` and ``upsample`` other than ``'transposed'``: every 3x3/4x4 conv of
#: the encoder after the one reading the image (``conv2`` at H/4 from H/2, ``conv3``, the two
#: residual 3x3s) and of the decoder after the one reading the codes (the two residual 3x3s
#: at H/4, ``upsample1.conv`` at H/2, ``upsample2.conv`` at H: its highest-resolution conv,
#: which writes the image). The 1x1 convs, ``encoder.conv1`` (3 input channels) and
#: ``decoder.conv1`` stay plain.
INCLUDE_4_PLUS_4 = (
    "encoder.conv2",
    "encoder.conv3",
    "encoder.residual.layers.*.conv1",
    "decoder.residual.layers.*.conv1",
    "decoder.upsample1.conv",
    "decoder.upsample2.conv",
)


class VectorQuantizerEMA(nn.Module):
    """Nearest-code quantiser whose codebook follows an exponential moving average of the
    vectors assigned to each code (Sonnet's ``VectorQuantizerEMA``; no codebook gradient).

    Per training step: ``N_k`` (codes' counts) and ``m_k`` (sums of their vectors) are averaged
    with ``decay`` and zero-debiasing; ``N_k`` gets Laplace smoothing
    ``(N_k + eps) / (n + K eps) * n``; the code is ``m_k / N_k``. Under ``torch.distributed`` the
    counts and sums are summed over ranks first, so every replica keeps the same codebook.
    Eval never changes the buffers. The encoder gets the commitment loss
    ``commitment_cost * ||z - sg(e)||^2`` and the straight-through gradient of the decoder.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_embeddings = positive_int(num_embeddings, "num_embeddings")
        self.embedding_dim = positive_int(embedding_dim, "embedding_dim")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if not float(epsilon) > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if not float(commitment_cost) >= 0:
            raise ValueError(f"commitment_cost must be >= 0, got {commitment_cost}")
        self.commitment_cost, self.decay, self.epsilon = float(commitment_cost), float(decay), float(epsilon)
        limit = (3.0 / embedding_dim) ** 0.5  # Sonnet: variance scaling, uniform, fan-in = embedding dim
        self.register_buffer("embedding", torch.empty(num_embeddings, embedding_dim).uniform_(-limit, limit))
        self.register_buffer("ema_cluster_size", torch.zeros(num_embeddings))  # hidden (biased) EMA of N_k
        self.register_buffer("ema_embedding_sum", torch.zeros(num_embeddings, embedding_dim))  # hidden EMA of m_k
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"commitment_cost={self.commitment_cost}, decay={self.decay}, epsilon={self.epsilon}"
        )

    def count_macs(self, inputs: tuple, output: dict) -> int:
        """Distances of every latent vector to every code (for :mod:`dynconv.models.flops`)."""
        return output["codes"].numel() * self.num_embeddings * self.embedding_dim

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``z`` ``(N, D, H, W)`` -> ``dict(quantized (N, D, H, W), codes (N, H, W) int64,
        commitment_loss (), perplexity () of this batch's codes, code_counts (num_embeddings,)
        how often each code was picked in this batch)``."""
        float_input(z, "z", channels=self.embedding_dim)
        with torch.autocast(z.device.type, enabled=False):  # code choice and EMA in >= fp32, also under AMP
            return self._quantize(z.to(torch.promote_types(z.dtype, torch.float32)))

    def _quantize(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        n, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        codebook = self.embedding.to(flat.dtype)
        with torch.no_grad():
            distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)
            codes = distances.argmin(1)
        quantized = codebook[codes].view(n, h, w, d).permute(0, 3, 1, 2)  # the codes before this step's update
        if self.training:
            self._update(flat.detach(), codes)
        commitment_loss = self.commitment_cost * F.mse_loss(z, quantized.detach())
        quantized = z + (quantized - z).detach()  # straight-through: the decoder's gradient reaches z
        counts = torch.bincount(codes, minlength=self.num_embeddings).to(flat.dtype)
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return {
            "quantized": quantized,
            "codes": codes.view(n, h, w),
            "commitment_loss": commitment_loss,
            "perplexity": perplexity,
            "code_counts": counts,
        }

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        counts = torch.bincount(codes, minlength=self.num_embeddings).to(self.ema_cluster_size.dtype)
        sums = torch.zeros_like(self.ema_embedding_sum).index_add_(0, codes, flat.to(self.ema_embedding_sum.dtype))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_steps += 1
        self.ema_cluster_size.lerp_(counts, 1.0 - self.decay)
        self.ema_embedding_sum.lerp_(sums, 1.0 - self.decay)
        debias = 1.0 - self.decay ** self.ema_steps.double()
        cluster_size = self.ema_cluster_size / debias.to(self.ema_cluster_size.dtype)
        total = cluster_size.sum()
        smoothed = (cluster_size + self.epsilon) / (total + self.num_embeddings * self.epsilon) * total
        embedding_sum = self.ema_embedding_sum / debias.to(self.ema_embedding_sum.dtype)
        self.embedding.copy_(embedding_sum / smoothed.unsqueeze(1))


class Residual(nn.Module):
    """``x + conv1x1(ReLU(conv3x3(ReLU(x))))`` (Sonnet's residual layer)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class ResidualStack(nn.Module):
    def __init__(self, channels: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Residual(channels, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return F.relu(x)


class Encoder(nn.Module):
    def __init__(self, in_channels: int, hidden: int, res_layers: int, res_hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden // 2, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.residual = ResidualStack(hidden, res_hidden, res_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.residual(self.conv3(x))


class Upsample2x(nn.Module):
    """x2 upsampling (``'nearest'`` or ``'pixel_shuffle'``), then a 3x3 ``nn.Conv2d`` at the new
    resolution: unlike a transposed conv, a conv that :func:`dynconv.convert` can convert."""

    def __init__(self, mode: str, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.mode = choice(mode, "upsample", UPSAMPLING[1:])
        if mode == "pixel_shuffle" and in_channels % 4:
            raise ValueError(f"upsample='pixel_shuffle' needs a channel count divisible by 4, got {in_channels}")
        conv_in = in_channels // 4 if mode == "pixel_shuffle" else in_channels
        self.conv = nn.Conv2d(conv_in, out_channels, 3, padding=1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "pixel_shuffle":
            x = F.pixel_shuffle(x, 2)
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x)


class Decoder(nn.Module):
    def __init__(self, embedding_dim: int, hidden: int, res_layers: int, res_hidden: int, out_channels: int,
                 upsample: str = "transposed") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(embedding_dim, hidden, 3, padding=1)
        self.residual = ResidualStack(hidden, res_hidden, res_layers)
        self.upsample_mode = choice(upsample, "upsample", UPSAMPLING)
        if upsample == "transposed":  # the original layout (and state-dict keys)
            self.deconv1 = nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1)
            self.deconv2 = nn.ConvTranspose2d(hidden // 2, out_channels, 4, stride=2, padding=1)
        else:
            self.upsample1 = Upsample2x(upsample, hidden, hidden // 2)
            self.upsample2 = Upsample2x(upsample, hidden // 2, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.residual(self.conv1(z))
        if self.upsample_mode == "transposed":
            return self.deconv2(F.relu(self.deconv1(x)))
        return self.upsample2(F.relu(self.upsample1(x)))


class VQVAE(nn.Module):
    """``forward(x)`` -> ``dict(reconstruction (N, C, H, W), commitment_loss (), codes (N, H/4, W/4),
    perplexity (), code_counts (num_embeddings,))``; H and W must be multiples of 4. The
    reconstruction loss is the trainer's (e.g. MSE to the input); ``commitment_loss`` is already
    weighted by ``commitment_cost``; ``perplexity`` and ``code_counts`` are of this batch's codes
    (the eval metrics ``codebook_perplexity`` / ``dead_codes`` sum the counts over an eval set)."""

    def __init__(
        self,
        *,
        in_channels: int,
        hidden_channels: int,
        residual_layers: int,
        residual_channels: int,
        embedding_dim: int,
        num_embeddings: int,
        commitment_cost: float,
        decay: float,
        epsilon: float,
        upsample: str = "transposed",
    ) -> None:
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        hidden = positive_int(hidden_channels, "hidden_channels", minimum=2)
        choice(upsample, "upsample", UPSAMPLING)
        if upsample == "pixel_shuffle" and hidden % 8:
            raise ValueError(f"upsample='pixel_shuffle' needs hidden_channels divisible by 8 (two x2 shuffles of "
                             f"hidden and hidden/2 channels), got {hidden}")
        res_layers = positive_int(residual_layers, "residual_layers", minimum=0)
        res_hidden = positive_int(residual_channels, "residual_channels")
        self.encoder = Encoder(in_channels, hidden, res_layers, res_hidden)
        self.pre_quantization = nn.Conv2d(hidden, positive_int(embedding_dim, "embedding_dim"), 1)
        self.quantizer = VectorQuantizerEMA(
            num_embeddings, embedding_dim, commitment_cost=commitment_cost, decay=decay, epsilon=epsilon
        )
        self.decoder = Decoder(embedding_dim, hidden, res_layers, res_hidden, in_channels, upsample)

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The residual layers of encoder and decoder."""
        return [*self.encoder.residual.layers, *self.decoder.residual.layers]

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        float_input(x, "x", channels=self.in_channels)
        if x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"x must have H and W divisible by 4 (two stride-2 convs), got shape {tuple(x.shape)}")
        return self.quantizer(self.pre_quantization(self.encoder(x)))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Images from code indices ``(N, h, w)`` (e.g. sampled by a stage-2 prior)."""
        z = self.quantizer.embedding[codes].permute(0, 3, 1, 2)
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        q = self.encode(x)
        return {
            "reconstruction": self.decoder(q["quantized"]),
            "commitment_loss": q["commitment_loss"],
            "codes": q["codes"],
            "perplexity": q["perplexity"],
            "code_counts": q["code_counts"],
        }


@register_model("vqvae", task="reconstruction")
def vqvae(
    in_channels: int = 3,
    hidden_channels: int = 128,
    residual_layers: int = 2,
    residual_channels: int = 32,
    embedding_dim: int = 64,
    num_embeddings: int = 512,
    commitment_cost: float = 0.25,
    decay: float = 0.99,
    epsilon: float = 1e-5,
    upsample: str = "transposed",
) -> VQVAE:
    """VQ-VAE stage 1 with Sonnet's defaults (128 hidden, 2 residual layers of 32, 512 codes of dim 64,
    commitment 0.25, EMA decay 0.99, eps 1e-5); latents are H/4 x W/4. ``upsample``: the
    decoder's x2 upsamplings, one of :data:`UPSAMPLING` (``'transposed'``, the default, is
    Sonnet's and what earlier checkpoints hold; the others end in convertible 3x3 convs)."""
    return VQVAE(
        in_channels=in_channels,
        hidden_channels=hidden_channels,
        residual_layers=residual_layers,
        residual_channels=residual_channels,
        embedding_dim=embedding_dim,
        num_embeddings=num_embeddings,
        commitment_cost=commitment_cost,
        decay=decay,
        epsilon=epsilon,
        upsample=upsample,
    )
