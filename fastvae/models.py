"""Small VAEs for images, written as the example to copy: an MLP and a conv encoder/decoder.

Both take images ``(B, C, H, W)`` with values in [0, 1]. The encoder gives q(z|x) = N(mu, diag(exp(logvar))),
``fastvae.distributions.DiagonalGaussianDistribution`` (ldm's posterior) draws z and the KL against N(0, I) in
one pass, and the decoder gives the mean
of p(x|z) = N(x_hat, var) (sigmoid, so in [0, 1]), or with ``logits=True`` the logits of a Bernoulli p(x|z)
(``mean()`` maps them to probabilities). With ``learned_var=True`` the decoder also learns one
log-variance per pixel, ``logvar_x``, for ``fastvae.nn.ELBOLoss(likelihood="gaussian-learned-var")``.

    model = ConvVAE(in_channels=1, image_size=28, latent_dim=16)
    out = model(x)                                   # VAEOutput(x_hat, logvar_x, mu, logvar, kl, None)
    out = model(x, num_samples=K)                    # x_hat (K, B, ...), log_ratio (K, B): IWAE
    loss = fastvae.nn.ELBOLoss(var=0.1)(out.x_hat, x, out.mu, out.logvar)
    loss.backward()

``DiscreteVAE`` puts the same encoder and decoder around a discrete bottleneck (``fastvae.nn``'s VectorQuantize,
ResidualVQ, LFQ, FSQ or GumbelQuantize): ``python -m fastvae.train --latent vq``.

``backend``: as fastvae's functions take it; None (the default) follows ``fastvae.set_backend`` at each call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

import fastvae
from fastvae._checks import _check_backend
from fastvae.distributions import DiagonalGaussianDistribution

__all__ = ["VAEOutput", "VAE", "MLPVAE", "ConvVAE", "build_model"]

# floor of the learned per-pixel log-variance: pixels that are always 0 (digit borders) would otherwise drive
# their variance, and the likelihood, to infinity
LOGVAR_X_MIN = -6.0
LOGVAR_X_INIT = -3.0  # variance 0.05 to start with: a unit variance would take long to shrink


class VAEOutput(NamedTuple):
    x_hat: Tensor  # decoder mean, the shape of x
    logvar_x: Tensor | None  # learned log-variance of p(x|z), broadcasts to x; None for a fixed variance
    mu: Tensor  # (B, latent_dim)
    logvar: Tensor  # (B, latent_dim)
    kl: Tensor | None  # KL(q(z|x) || N(0, I)) summed over latent dims, mean over the batch (one sample)
    log_ratio: Tensor | None = None  # (K, B) with num_samples=K: log p(z) - log q(z|x) of each sample


class VAE(nn.Module):
    """Shared forward: encode, sample z with its KL, decode. Subclasses set ``encoder``, ``decoder``."""

    encoder: nn.Module  # x -> (B, 2 * latent_dim): mu and logvar side by side
    decoder: nn.Module  # z -> x_hat before the sigmoid

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, learned_var: bool, backend=None,
                 logits: bool = False, num_mixtures: int | None = None):
        super().__init__()
        self.image_shape, self.latent_dim = tuple(image_shape), latent_dim
        self.backend = _check_backend(backend)  # None: the global setting, read at each call
        self.logits = logits  # the decoder gives Bernoulli logits (no sigmoid) instead of a Gaussian mean
        # num_mixtures: the decoder gives the params of a discretized mixture of logistics per pixel
        self.num_mixtures = num_mixtures
        if num_mixtures is not None:
            self.logits = True  # raw decoder output
        c = image_shape[0]
        self.out_shape = self.image_shape if num_mixtures is None else (
            num_mixtures * (10 if c == 3 else 3), *self.image_shape[1:])
        self.logvar_x = nn.Parameter(torch.full(self.image_shape, LOGVAR_X_INIT)) if learned_var else None

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.decoder(z)
        x_hat = out if self.logits else torch.sigmoid(out)
        if self.logvar_x is None:
            return x_hat, None
        # a soft floor at LOGVAR_X_MIN that keeps a gradient everywhere
        logvar_x = LOGVAR_X_MIN + nn.functional.softplus(self.logvar_x - LOGVAR_X_MIN)
        return x_hat, logvar_x

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                num_samples: int | None = None) -> VAEOutput:
        """One sample of z with its KL; with ``num_samples=K``, K samples with their log importance ratios
        (x_hat of shape (K, B, ...), for ``fastvae.iwae_bound``)."""
        if num_samples is None:
            # ldm's posterior idiom on the encoder's (B, 2 * latent_dim) output seen as (B, 2 * latent_dim, 1, 1):
            # mu and logvar are read in place, z and the per-sample KL come from one kernel pass
            h = self.encoder(x)
            posterior = DiagonalGaussianDistribution(h[:, :, None, None], backend=self.backend)
            z = posterior.sample(generator=generator).flatten(1)
            kl = posterior.kl().mean()  # sum over the latent dims, mean over the batch
            x_hat, logvar_x = self.decode(z)
            mu, logvar = h.chunk(2, dim=1)
            return VAEOutput(x_hat, logvar_x, mu, logvar, kl)
        mu, logvar = self.encode(x)
        z, log_ratio = fastvae.sample_log_weights(mu, logvar, num_samples=num_samples, generator=generator,
                                                  backend=self.backend)
        x_hat, logvar_x = self.decode(z.flatten(0, 1))
        return VAEOutput(x_hat.unflatten(0, z.shape[:2]), logvar_x, mu, logvar, None, log_ratio)

    def mean(self, x_hat: Tensor) -> Tensor:
        """The mean of p(x|z) from the decoder's output: the Bernoulli probabilities for logits; for a mixture
        of logistics the mixture weights' average of channel 0's means (coefficients left out), in [0, 1]."""
        if self.num_mixtures is not None:
            m = self.num_mixtures
            w = torch.softmax(x_hat[:, :m], dim=1)
            return (((w * x_hat[:, m:2 * m]).sum(1, keepdim=True).clamp(-1, 1) + 1) / 2).expand(
                -1, self.image_shape[0], -1, -1)
        return torch.sigmoid(x_hat) if self.logits else x_hat

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Decoder means for z ~ N(0, I)."""
        p = next(self.parameters())
        z = torch.randn(n, self.latent_dim, device=p.device, generator=generator)
        return self.mean(self.decode(z)[0])


class MLPVAE(VAE):
    """Fully connected encoder and decoder on the flattened image."""

    def __init__(self, image_shape=(1, 28, 28), latent_dim: int = 16, hidden: tuple[int, ...] = (512, 256),
                 learned_var: bool = False, backend=None, logits: bool = False, num_mixtures: int | None = None):
        super().__init__(image_shape, latent_dim, learned_var, backend, logits, num_mixtures)
        features = image_shape[0] * image_shape[1] * image_shape[2]
        out_features = self.out_shape[0] * self.out_shape[1] * self.out_shape[2]
        enc: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in zip((features, *hidden), hidden):
            enc += [nn.Linear(d_in, d_out), nn.SiLU()]
        self.encoder = nn.Sequential(*enc, nn.Linear(hidden[-1], 2 * latent_dim))
        dec: list[nn.Module] = []
        for d_in, d_out in zip((latent_dim, *hidden[::-1]), hidden[::-1]):
            dec += [nn.Linear(d_in, d_out), nn.SiLU()]
        self.decoder = nn.Sequential(*dec, nn.Linear(hidden[0], out_features), nn.Unflatten(1, self.out_shape))


class ConvVAE(VAE):
    """Stride-2 convs down to at most 4 x 4 pixels (channels ``width``, 2 ``width``, ... up to 8 ``width``),
    a linear layer to and from the latent, and the transposed convs back up to exactly ``image_size``.
    8 x 8 digits take one conv, 28 x 28 MNIST three (28 -> 14 -> 7 -> 3), 64 x 64 images four."""

    def __init__(self, in_channels: int = 1, image_size: int | tuple[int, int] = 28, latent_dim: int = 16,
                 width: int = 32, learned_var: bool = False, backend=None, logits: bool = False,
                 num_mixtures: int | None = None):
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        super().__init__((in_channels, h, w), latent_dim, learned_var, backend, logits, num_mixtures)
        if min(h, w) < 8:
            raise ValueError(f"ConvVAE needs images of at least 8 x 8 pixels, got {h} x {w}")
        sizes = [(h, w)]  # spatial size after each conv: k=4, s=2, p=1 maps n to n // 2
        while max(sizes[-1]) > 4 and min(sizes[-1]) >= 4:
            sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
        chans = [in_channels] + [width * 2 ** min(i, 3) for i in range(len(sizes) - 1)]
        n = len(sizes) - 1
        enc: list[nn.Module] = []
        for i in range(n):
            enc += [nn.Conv2d(chans[i], chans[i + 1], 4, 2, 1), nn.SiLU()]
        dec: list[nn.Module] = []
        for i in reversed(range(n)):
            # a transposed conv with k=4, s=2, p=1 maps n to 2n + output_padding: pads odd sizes back up
            pad = (sizes[i][0] - 2 * sizes[i + 1][0], sizes[i][1] - 2 * sizes[i + 1][1])
            c_out = chans[i] if i else self.out_shape[0]
            dec += [nn.ConvTranspose2d(chans[i + 1], c_out, 4, 2, 1, output_padding=pad), nn.SiLU()]
        dec.pop()  # no activation after the last layer: decode() applies the sigmoid
        flat = chans[-1] * sizes[-1][0] * sizes[-1][1]
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(flat, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, flat), nn.SiLU(),
                                     nn.Unflatten(1, (chans[-1], *sizes[-1])), *dec)


def build_model(kind: str, image_shape: tuple[int, int, int], latent_dim: int, learned_var: bool = False,
                backend=None, logits: bool = False, num_mixtures: int | None = None) -> VAE:
    """``kind`` "mlp" or "conv", for images of ``image_shape`` = (C, H, W); ``logits``: a Bernoulli decoder;
    ``num_mixtures``: a decoder of discretized mixture-of-logistics params."""
    if kind == "mlp":
        return MLPVAE(image_shape, latent_dim, learned_var=learned_var, backend=backend, logits=logits,
                      num_mixtures=num_mixtures)
    if kind == "conv":
        c, h, w = image_shape
        return ConvVAE(c, (h, w), latent_dim, learned_var=learned_var, backend=backend, logits=logits,
                       num_mixtures=num_mixtures)
    raise ValueError(f"model must be 'mlp' or 'conv', got {kind!r}")


# ------------------------------------------------------------------------------------------ discrete latents

__all__ += ["LATENTS", "DiscreteOutput", "DiscreteVAE", "fsq_levels"]

LATENTS = ("gaussian", "vq", "rvq", "lfq", "fsq", "gumbel")
CODE_DIM = 4  # features of a vq / rvq code and of a gumbel code's embedding
# Mentzer et al. 2023, table: the levels recommended for a target codebook size
FSQ_LEVELS = {2**8: [8, 6, 5], 2**10: [8, 5, 5, 5], 2**12: [7, 5, 5, 5, 5], 2**14: [8, 8, 8, 6, 5],
              2**16: [8, 8, 8, 5, 5, 5]}


def fsq_levels(codebook_size: int) -> list[int]:
    """The FSQ paper's levels for ``codebook_size`` (2^8, 2^10, 2^12, 2^14 or 2^16 codes)."""
    if codebook_size not in FSQ_LEVELS:
        raise ValueError(f"FSQ levels are tabulated for codebook sizes {', '.join(map(str, FSQ_LEVELS))}, got "
                         f"{codebook_size}")
    return FSQ_LEVELS[codebook_size]


class DiscreteOutput(NamedTuple):
    x_hat: Tensor  # decoder output, the shape of x
    logvar_x: Tensor | None  # as VAEOutput's
    indices: Tensor  # (B, tokens), (B, tokens, stages) for rvq: int64
    quantizer_loss: Tensor  # the quantizer's own loss (commitment, entropy terms), 0-d; 0 for fsq and gumbel
    kl: Tensor  # KL(q(codes|x) || uniform) summed over the tokens, mean over the batch (nats per image)


class DiscreteVAE(nn.Module):
    """The encoder and decoder of ``build_model(kind, ...)`` around a discrete bottleneck of ``tokens``
    codes an image, one of ``fastvae.nn``'s quantizers:

    - "vq": ``VectorQuantize`` of CODE_DIM-feature tokens, EMA codebook (decay 0.99, VQ-VAE-2's), k-means
      initialization on the first batch, commitment weight 0.25 (the VQ-VAE paper's beta);
    - "rvq": ``ResidualVQ`` with ``num_quantizers`` stages, the same codebook settings;
    - "lfq": ``LFQ`` of log2(codebook_size) bits a token; "fsq": ``FSQ`` with ``fsq_levels(codebook_size)``;
    - "gumbel": ``GumbelQuantize`` (taming's) over codebook_size codes of CODE_DIM features, temperature 1.

    The deterministic quantizers' posterior is one code a token, so the KL to the uniform prior over the K
    codes is log K a token (VQ-VAE's constant: ``kl``); the Gumbel posterior's KL is computed. ``encode(x)``
    returns (the quantized latent, flattened for the decoder, None), ``sample(n)`` decodes uniformly drawn codes.
    """

    def __init__(self, kind: str, image_shape: tuple[int, int, int], latent: str, tokens: int, codebook_size: int,
                 num_quantizers: int = 1, learned_var: bool = False, backend=None, logits: bool = False,
                 num_mixtures: int | None = None):
        super().__init__()
        from . import nn as fnn

        if latent not in LATENTS[1:]:
            raise ValueError(f"latent must be one of {', '.join(LATENTS[1:])}, got {latent!r}")
        self.latent, self.tokens, self.codebook_size = latent, tokens, codebook_size
        self.num_quantizers = num_quantizers if latent == "rvq" else 1
        self.latent_dim = None  # no continuous latent to plot
        if latent == "lfq":
            bits = codebook_size.bit_length() - 1
            if codebook_size < 2 or 1 << bits != codebook_size:
                raise ValueError(f"lfq needs a codebook size that is a power of 2, got {codebook_size}")
            code_dim = bits
            self.quantizer = fnn.LFQ(codebook_size=codebook_size, backend=backend)
        elif latent == "fsq":
            levels = fsq_levels(codebook_size)
            code_dim = len(levels)
            self.quantizer = fnn.FSQ(levels, backend=backend)
        elif latent == "gumbel":
            code_dim = CODE_DIM
            self.quantizer = fnn.GumbelQuantize(CODE_DIM, CODE_DIM, codebook_size, kl_weight=1.0, backend=backend)
        else:
            code_dim = CODE_DIM
            common = dict(codebook_size=codebook_size, decay=0.99, kmeans_init=True, commitment_weight=0.25,
                          backend=backend)
            self.quantizer = (fnn.VectorQuantize(CODE_DIM, **common) if latent == "vq" else
                              fnn.ResidualVQ(dim=CODE_DIM, num_quantizers=num_quantizers, **common))
        self.code_dim = code_dim
        self.base = build_model(kind, image_shape, tokens * code_dim, learned_var=learned_var, backend=backend,
                                logits=logits, num_mixtures=num_mixtures)
        head = self.base.encoder[-1]  # (B, 2 * latent) for the Gaussian: here one pre-quantization token each
        self.base.encoder[-1] = nn.Linear(head.in_features, tokens * code_dim)
        self.image_shape = self.base.image_shape
        self.backend = backend

    def _quantize(self, h: Tensor, generator: torch.Generator | None = None):
        """(flat quantized latent (B, tokens * code_dim), indices, quantizer loss, KL per image)."""
        b = h.shape[0]
        tokens = h.view(b, self.tokens, self.code_dim)
        zero = h.new_zeros(())
        if self.latent == "gumbel":  # positions = tokens: (B, code_dim, tokens, 1)
            z_q, kl_mean, (_, _, ind) = self.quantizer(tokens.transpose(1, 2).unsqueeze(-1), generator=generator)
            return z_q.squeeze(-1).transpose(1, 2).reshape(b, -1), ind.reshape(b, self.tokens), zero, \
                kl_mean * self.tokens
        if self.latent == "fsq":
            q, ind = self.quantizer(tokens)
            loss = zero
        else:
            q, ind, loss = self.quantizer(tokens)
        log_k = math.log(self.codebook_size) * self.num_quantizers * self.tokens
        return q.reshape(b, -1), ind, loss, torch.full_like(zero, log_k)

    def encode(self, x: Tensor) -> tuple[Tensor, None]:
        return self._quantize(self.base.encoder(x))[0], None

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.base.decode(z)

    def mean(self, x_hat: Tensor) -> Tensor:
        return self.base.mean(x_hat)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> DiscreteOutput:
        z, indices, loss, kl = self._quantize(self.base.encoder(x), generator)
        x_hat, logvar_x = self.decode(z)
        return DiscreteOutput(x_hat, logvar_x, indices, loss, kl)

    def usage(self, indices: Tensor) -> Tensor:
        """Per-code counts of ``indices``, (codebooks, K): one row per rvq stage, else one. A scatter-add of ones
        (integer adds: exact in any order), where torch.bincount reads the largest index back to the host on
        CUDA to size its output."""
        rows = indices.reshape(-1, self.num_quantizers).t()
        counts = torch.zeros(rows.shape[0], self.codebook_size, dtype=torch.int64, device=indices.device)
        return counts.scatter_add_(1, rows, torch.ones_like(rows))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Decoder means for codes drawn uniformly (independently per token and stage)."""
        p = next(self.parameters())
        draw = torch.randint(0, self.codebook_size, (n, self.tokens, self.num_quantizers), device=p.device,
                             generator=generator)
        if self.latent in ("vq", "rvq"):
            books = self.quantizer._codebook.embed  # (1 or S, K, D)
            z = sum(books[s][draw[..., s]] for s in range(self.num_quantizers))
        elif self.latent == "gumbel":
            z = self.quantizer.embed.weight[draw[..., 0]]
        elif self.latent == "lfq":
            bits = (draw[..., :1] >> torch.arange(self.code_dim, device=p.device)) & 1
            z = (bits.float() * 2 - 1) * self.quantizer.codebook_scale
        else:  # fsq: one level per channel, scaled as the quantizer's codes
            levels = torch.tensor(self.quantizer.levels, device=p.device)
            u = torch.rand(n, self.tokens, self.code_dim, device=p.device, generator=generator)
            half = levels // 2
            z = ((u * levels).floor() - half) / half
        return self.mean(self.decode(z.reshape(n, -1).to(p.dtype))[0])
