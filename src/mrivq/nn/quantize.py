"""EMA vector quantizer: nearest-code lookup, EMA codebook, data initialisation, dead-code restart.

The codebook is not trained by gradients. In training mode each forward pass moves the codes
towards the mean of the encoder outputs assigned to them (exponential moving averages of
cluster sizes and code sums, with Laplace smoothing of the sizes). Eval mode never changes a
buffer. Distances and statistics are computed in float32 even under autocast.

Buffers (all in ``state_dict`` except ``n_restarted``):

- ``embed``        ``(n_embed, embed_dim)`` float32, the codebook; row ``k`` is code ``k``.
- ``cluster_size`` ``(n_embed,)`` float32, EMA of how many vectors each code received per
  batch (the codebook's usage; divide by its sum for frequencies).
- ``embed_avg``    ``(n_embed, embed_dim)`` float32, EMA of the sum of vectors per code.
- ``initialised``  ``()`` bool, True once the codebook has been seeded from data.
- ``n_restarted``  ``()`` int64, how many codes the last training step restarted (not saved).

Multi-process: when ``torch.distributed`` is initialised, per-batch counts and code sums are
all-reduced (summed) before the EMA update; the data-initialisation sample comes from rank 0,
and after each training step rank 0's codebook (``embed``, ``embed_avg``, ``cluster_size``)
is broadcast, so initialisation and dead-code restarts are decided by rank 0 and every rank
keeps an identical codebook.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class QuantizerOutput(NamedTuple):
    """What :class:`VectorQuantizer` returns.

    quantized: ``(B, embed_dim, H, W)``, the chosen codes, with a straight-through gradient
        to the input; same dtype and memory layout as the input.
    commitment_loss: scalar float32, ``mean((z - code.detach())**2)`` over all elements.
    codes: ``(B, H, W)`` int64 code indices in ``[0, n_embed)``.
    """

    quantized: torch.Tensor
    commitment_loss: torch.Tensor
    codes: torch.Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _same_layout(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``tensor`` in ``reference``'s memory format (channels_last or contiguous)."""
    if reference.is_contiguous(memory_format=torch.channels_last):
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor.contiguous()


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with an EMA-updated codebook.

    Args:
        embed_dim: length ``D`` of each code vector (channels of the input).
        n_embed: number of codes ``K``.
        decay: EMA decay of cluster sizes and code sums, in ``[0, 1)``; 0 replaces the
            statistics by each batch's.
        eps: Laplace smoothing of cluster sizes, ``(N_k + eps) / (N + K * eps) * N``, which
            keeps codes that received nothing from dividing by zero.
        init_from_data: seed the codebook with a random sample of the first training batch's
            inputs (sampled with replacement when the batch has fewer than ``K`` vectors).
            Off: the codebook starts as standard normal vectors.
        restart_dead_codes: after every training-mode EMA update, codes whose EMA cluster
            size is below ``dead_code_threshold`` are re-seeded with input vectors of the
            current batch, chosen by ``restart_from``.
        restart_from: ``random`` (uniformly chosen vectors) or ``worst`` (the vectors farthest
            from their nearest code: a restart serves what the codebook serves worst, splitting
            crowded clusters instead of landing inside them).
        kmeans_iters: Lloyd iterations refining the data initialisation on the first batch
            (0: the random sample as it is).
        cosine: look codes up by direction: the input vectors and the codes are scaled to unit
            length (the codebook after every EMA update), so an encoder cannot lower its
            commitment loss by shrinking its output towards one point, the collapse a lightly
            used top level falls into (Yu et al., "Vector-quantized image modeling with improved
            VQGAN", 2022, normalise codes for better codebook use).
        dead_code_threshold: in vectors per batch (EMA). The default 1.0 means "received less
            than about one vector per batch lately". A restarted code gets
            ``cluster_size = dead_code_threshold`` and ``embed_avg = code * threshold``, so it
            survives the next check only if it receives at least ``threshold`` vectors in the
            next batch, and is re-seeded otherwise. 0 never restarts.

    At construction (and at data initialisation) every code gets a pseudo-count
    ``cluster_size = 1`` with ``embed_avg = embed``, so unused codes keep their position
    instead of collapsing towards zero as their statistics decay.

    Example:
        >>> vq = VectorQuantizer(embed_dim=4, n_embed=16)
        >>> out = vq(torch.randn(2, 4, 8, 8))
        >>> out.quantized.shape, out.codes.shape
        (torch.Size([2, 4, 8, 8]), torch.Size([2, 8, 8]))
    """

    embed: torch.Tensor
    cluster_size: torch.Tensor
    embed_avg: torch.Tensor
    initialised: torch.Tensor
    n_restarted: torch.Tensor

    def __init__(
        self,
        embed_dim: int,
        n_embed: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        init_from_data: bool = True,
        restart_dead_codes: bool = True,
        dead_code_threshold: float = 1.0,
        restart_from: str = "random",
        kmeans_iters: int = 0,
        cosine: bool = False,
    ) -> None:
        super().__init__()
        if restart_from not in ("random", "worst"):
            raise ValueError(f"restart_from must be 'random' or 'worst', got {restart_from!r}")
        if kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {kmeans_iters}")
        if embed_dim < 1 or n_embed < 1:
            raise ValueError(f"embed_dim and n_embed must be >= 1, got {embed_dim} and {n_embed}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if eps <= 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if dead_code_threshold < 0.0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold}")
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.decay = float(decay)
        self.eps = float(eps)
        self.init_from_data = bool(init_from_data)
        self.restart_dead_codes = bool(restart_dead_codes)
        self.dead_code_threshold = float(dead_code_threshold)
        self.restart_from = restart_from
        self.kmeans_iters = int(kmeans_iters)
        self.cosine = bool(cosine)

        # (nn.init, not torch.randn: the same numbers, and a shapes-only build skips it)
        embed = nn.init.normal_(torch.empty(n_embed, embed_dim))
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(n_embed))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("n_restarted", torch.tensor(0, dtype=torch.int64), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, n_embed={self.n_embed}, decay={self.decay}, "
            f"eps={self.eps}, init_from_data={self.init_from_data}, "
            f"restart_dead_codes={self.restart_dead_codes}, "
            f"dead_code_threshold={self.dead_code_threshold}, restart_from={self.restart_from}, "
            f"kmeans_iters={self.kmeans_iters}, cosine={self.cosine}"
        )

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``(B, embed_dim, H, W)``; in training mode also update the codebook.

        The returned ``quantized`` holds the codes chosen with the codebook as it was before
        this batch's EMA update.
        """
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(
                f"expected (B, {self.embed_dim}, H, W) encoder output, got {tuple(z.shape)}"
            )
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = self._unit(z.float())
            flat = z32.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
            if self.training and self.init_from_data:
                self._initialise_once(flat.detach())
            codes_flat, distances = self._nearest(flat.detach(), with_distances=True)
            code_vectors = F.embedding(codes_flat, self.embed)  # a copy: safe from the update
            if self.training:
                self._update_codebook(flat.detach(), codes_flat, distances)

            batch, _, height, width = z.shape
            chosen = code_vectors.reshape(batch, height, width, self.embed_dim).permute(0, 3, 1, 2)
            chosen = _same_layout(chosen, z)
            commitment_loss = F.mse_loss(z32, chosen)
            # chosen + (z - z): exactly the code's value forward, identity gradient backward.
            quantized = chosen + (z32 - z32.detach())
        return QuantizerOutput(
            quantized.to(z.dtype), commitment_loss, codes_flat.reshape(batch, height, width)
        )

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each vector of ``z`` ``(B, D, H, W)`` -> ``(B, H, W)``.

        Never changes the codebook, whatever the mode.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            batch, _, height, width = z.shape
            flat = self._unit(z.detach().float()).permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
            return self._nearest(flat).reshape(batch, height, width)

    def _unit(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` ``(B, D, H, W)`` with unit-length vectors when ``cosine``, else as it is."""
        return F.normalize(z, dim=1) if self.cosine else z

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors: indices ``(B, H, W)`` -> ``(B, embed_dim, H, W)`` float32, contiguous."""
        return F.embedding(codes, self.embed).permute(0, 3, 1, 2).contiguous()

    def _nearest(self, flat: torch.Tensor, with_distances: bool = False):
        """Nearest code of each row of ``flat`` ``(N, D)`` -> ``(N,)``; with ``with_distances``
        also each row's squared distance to it, up to the row's own ``||x||^2`` ``(N,)``."""
        # argmin_k ||x - e_k||^2 = argmin_k (||e_k||^2 - 2 x.e_k); ||x||^2 does not change it.
        distances = torch.addmm(self.embed.pow(2).sum(1), flat, self.embed.t(), alpha=-2.0)
        if not with_distances:
            return distances.argmin(1)
        nearest, codes = distances.min(1)
        return codes, nearest + flat.pow(2).sum(1)

    def _sample_vectors(self, flat: torch.Tensor) -> torch.Tensor:
        """``n_embed`` rows of ``flat``, distinct when there are enough."""
        n_vectors = flat.shape[0]
        if n_vectors >= self.n_embed:
            index = torch.randperm(n_vectors, device=flat.device)[: self.n_embed]
        else:
            index = torch.randint(0, n_vectors, (self.n_embed,), device=flat.device)
        return flat[index]

    @torch.no_grad()
    def _initialise_once(self, flat: torch.Tensor) -> None:
        # torch.where on the flag instead of `if not initialised`: no host sync per step.
        first = ~self.initialised
        sample = self._sample_vectors(flat)
        for _ in range(self.kmeans_iters):  # Lloyd steps on this batch; empty clusters stay put
            assigned = torch.cdist(flat, sample).argmin(1)
            sums = torch.zeros_like(sample).index_add_(0, assigned, flat)
            counts = torch.zeros(len(sample), device=flat.device).index_add_(
                0, assigned, torch.ones_like(assigned, dtype=torch.float32))
            sample = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], sample)
        if _distributed():  # every rank assigns this batch against rank 0's first codebook
            dist.broadcast(sample, src=0)
        self.embed.copy_(torch.where(first, sample, self.embed))
        self.embed_avg.copy_(torch.where(first, sample, self.embed_avg))
        ones = torch.ones_like(self.cluster_size)
        self.cluster_size.copy_(torch.where(first, ones, self.cluster_size))
        self.initialised.fill_(True)

    @torch.no_grad()
    def _update_codebook(self, flat: torch.Tensor, codes_flat: torch.Tensor, distances: torch.Tensor) -> None:
        counts = torch.zeros(self.n_embed, device=flat.device).index_add_(
            0, codes_flat, torch.ones_like(codes_flat, dtype=torch.float32)
        )
        sums = torch.zeros_like(self.embed).index_add_(0, codes_flat, flat)
        if _distributed():
            stats = torch.cat([counts[:, None], sums], dim=1)
            dist.all_reduce(stats)
            counts, sums = stats[:, 0], stats[:, 1:]

        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.n_embed * self.eps) * total
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        if self.cosine:
            self.embed.copy_(F.normalize(self.embed, dim=1))

        if self.restart_dead_codes:
            self._restart_dead_codes(flat, distances)
        if _distributed():
            for buffer in (self.embed, self.embed_avg, self.cluster_size):
                dist.broadcast(buffer, src=0)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, distances: torch.Tensor) -> None:
        dead = self.cluster_size < self.dead_code_threshold
        if self.restart_from == "worst" and len(flat) >= self.n_embed:
            # The n_embed worst-served vectors, worst first; dead code k takes the k-th worst
            # among them in a random order, so several dead codes never pile onto one vector.
            worst = distances.topk(self.n_embed).indices
            fresh = flat[worst[torch.randperm(self.n_embed, device=flat.device)]]
        else:
            fresh = self._sample_vectors(flat)
        dead_rows = dead[:, None]
        self.embed.copy_(torch.where(dead_rows, fresh, self.embed))
        threshold = self.dead_code_threshold
        self.embed_avg.copy_(torch.where(dead_rows, fresh * threshold, self.embed_avg))
        restarted_size = torch.full_like(self.cluster_size, threshold)
        self.cluster_size.copy_(torch.where(dead, restarted_size, self.cluster_size))
        self.n_restarted.copy_(dead.sum())
