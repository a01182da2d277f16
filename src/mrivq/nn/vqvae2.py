"""VQ-VAE-2 with two EMA codebooks: Encoder, Decoder, VQVAE2 (blocks in :mod:`mrivq.nn.layers`).

Layout (Razavi et al. 2019, as in the seed report)::

    x (B, C, H, W)
    enc_b (stride 4)     -> features_b (B, channel, H/4, W/4)
    enc_t (stride 2)     -> features_t (B, channel, H/8, W/8)
    1x1 conv, quantize_top -> quant_t (B, embed_dim, H/8, W/8), codes_top
    dec_t (stride 2) of quant_t, concat features_b, 1x1 conv, quantize_bottom
                         -> quant_b (B, embed_dim, H/4, W/4), codes_bottom
    upsample_t (transposed conv x2) of quant_t, concat quant_b, dec (stride 4)
                         -> reconstruction (B, C, H, W)

Sides that are not multiples of 8 are padded (replicate, bottom/right) to the next multiple
of 8 and the reconstruction is cropped back, so codes are ``(ceil(H/8), ceil(W/8))`` at the
top and twice that at the bottom.

Residual blocks (``block``): ``relu`` is the report's :class:`ResBlock`; ``norm`` is
:class:`NormResBlock` (GroupNorm, SiLU, two 3x3 convolutions, identity at initialisation).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mrivq.nn.layers import RESIDUAL_BLOCKS
from mrivq.nn.quantize import VectorQuantizer

#: Input sides are padded to a multiple of this (total downsampling of the top level).
SIZE_MULTIPLE = 8


def code_grid_shapes(image_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Top and bottom code grids of a VQ-VAE-2 for ``image_size`` ``(H, W)``."""
    top = (math.ceil(image_size[0] / SIZE_MULTIPLE), math.ceil(image_size[1] / SIZE_MULTIPLE))
    return top, (2 * top[0], 2 * top[1])


class Encoder(nn.Module):
    """Downsample by ``stride`` (4 or 2): ``(B, in_channel, H, W)`` -> ``(B, channel, H/s, W/s)``.

    Stride 4: two 4x4 stride-2 convolutions (to ``channel // 2``, then ``channel``) and a 3x3
    convolution; stride 2: one 4x4 stride-2 convolution and a 3x3 one. Then ``n_res_block``
    residual blocks (``block``: a key of :data:`mrivq.nn.layers.RESIDUAL_BLOCKS`) of ``n_res_channel`` hidden
    channels, and a ReLU.
    """

    def __init__(
        self,
        in_channel: int,
        channel: int,
        n_res_block: int,
        n_res_channel: int,
        stride: int,
        block: str = "relu",
    ) -> None:
        super().__init__()
        if stride == 4:
            layers: list[nn.Module] = [
                nn.Conv2d(in_channel, channel // 2, 4, stride=2, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(channel // 2, channel, 4, stride=2, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(channel, channel, 3, padding=1),
            ]
        elif stride == 2:
            layers = [
                nn.Conv2d(in_channel, channel // 2, 4, stride=2, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(channel // 2, channel, 3, padding=1),
            ]
        else:
            raise ValueError(f"Encoder stride must be 2 or 4, got {stride}")
        layers += [RESIDUAL_BLOCKS[block](channel, n_res_channel) for _ in range(n_res_block)]
        layers.append(nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """Upsample by ``stride`` (4 or 2): ``(B, in_channel, h, w)`` -> ``(B, out_channel, h*s, w*s)``.

    A 3x3 convolution to ``channel``, ``n_res_block`` residual blocks (``block``, as in
    :class:`Encoder`), a ReLU, then 4x4
    stride-2 transposed convolutions (two for stride 4, via ``channel // 2``; one for stride
    2). The output has no activation.
    """

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        channel: int,
        n_res_block: int,
        n_res_channel: int,
        stride: int,
        block: str = "relu",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channel, channel, 3, padding=1)]
        layers += [RESIDUAL_BLOCKS[block](channel, n_res_channel) for _ in range(n_res_block)]
        layers.append(nn.ReLU(inplace=True))
        if stride == 4:
            layers += [
                nn.ConvTranspose2d(channel, channel // 2, 4, stride=2, padding=1),
                nn.ReLU(inplace=True),
                nn.ConvTranspose2d(channel // 2, out_channel, 4, stride=2, padding=1),
            ]
        elif stride == 2:
            layers.append(nn.ConvTranspose2d(channel, out_channel, 4, stride=2, padding=1))
        else:
            raise ValueError(f"Decoder stride must be 2 or 4, got {stride}")
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class VQVAE2Output(NamedTuple):
    """What :meth:`VQVAE2.forward` returns.

    reconstruction: ``(B, in_channel, H, W)``, same dtype as the last decoder layer produces
        (float32, or bf16/fp16 under autocast); unbounded (no output activation).
    commitment_loss: scalar float32, the SUM of the top and bottom levels' commitment losses,
        each ``mean((encoder_output - code.detach())**2)``. The trainer multiplies it by
        ``latent_loss_weight``.
    codes_top: ``(B, ceil(H/8), ceil(W/8))`` int64.
    codes_bottom: ``(B, 2*ceil(H/8), 2*ceil(W/8))`` int64 (``H/4, W/4`` when 8 divides H, W).
    """

    reconstruction: torch.Tensor
    commitment_loss: torch.Tensor
    codes_top: torch.Tensor
    codes_bottom: torch.Tensor


class VQVAE2(nn.Module):
    """Two-level VQ-VAE-2 for single- or multi-channel 2D images.

    Args:
        in_channel: image channels (1 for MRI slices).
        channel: width of encoders and decoders.
        n_res_block: residual blocks in every encoder and decoder.
        n_res_channel: hidden channels of each residual block.
        embed_dim: code vector length at both levels.
        n_embed: codes per level (two codebooks of this size).
        decay, eps, init_from_data, restart_dead_codes, dead_code_threshold, restart_from,
            kmeans_iters: passed to both :class:`VectorQuantizer` levels; see there (threshold
            default 1.0 vector per batch).
        lookup: ``"euclidean"`` or ``"cosine"`` (the quantizers' ``cosine``).
        block: residual block of every encoder and decoder: ``"relu"`` (:class:`ResBlock`)
            or ``"norm"`` (:class:`NormResBlock`).
        bottom_dropout: training only, the fraction of slices decoded from their top codes alone.

    Every default is the config's (``model.*``, :class:`mrivq.config.ModelConfig`).

    Parts usable on their own: :meth:`encode` (images -> codes, never touches the codebooks)
    and :meth:`decode_codes` (codes -> images). In eval mode
    ``model.decode_codes(*model.encode(x), output_size=x.shape[-2:])`` equals
    ``model(x).reconstruction`` exactly.

    Example:
        >>> model = VQVAE2(channel=16, n_res_channel=8, embed_dim=8, n_embed=32).eval()
        >>> out = model(torch.rand(2, 1, 64, 32))
        >>> out.reconstruction.shape, out.codes_top.shape, out.codes_bottom.shape
        (torch.Size([2, 1, 64, 32]), torch.Size([2, 8, 4]), torch.Size([2, 16, 8]))
    """

    def __init__(
        self,
        in_channel: int = 1,
        channel: int = 128,
        n_res_block: int = 2,
        n_res_channel: int = 32,
        embed_dim: int = 64,
        n_embed: int = 64,
        decay: float = 0.99,
        eps: float = 1e-5,
        init_from_data: bool = True,
        restart_dead_codes: bool = True,
        dead_code_threshold: float = 1.0,
        block: str = "relu",
        restart_from: str = "worst",
        kmeans_iters: int = 0,
        lookup: str = "cosine",
        bottom_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channel < 1 or channel < 2 or n_res_block < 0 or n_res_channel < 1:
            raise ValueError(
                "need in_channel >= 1, channel >= 2, n_res_block >= 0, n_res_channel >= 1; got "
                f"{in_channel}, {channel}, {n_res_block}, {n_res_channel}"
            )
        if block not in RESIDUAL_BLOCKS:
            raise ValueError(f"block must be one of {sorted(RESIDUAL_BLOCKS)}, got {block!r}")
        if not 0 <= bottom_dropout < 1:
            raise ValueError(f"bottom_dropout must be in [0, 1), got {bottom_dropout}")
        self.in_channel = in_channel
        self.bottom_dropout = bottom_dropout
        quantizer_args = {
            "decay": decay,
            "eps": eps,
            "init_from_data": init_from_data,
            "restart_dead_codes": restart_dead_codes,
            "dead_code_threshold": dead_code_threshold,
            "restart_from": restart_from,
            "kmeans_iters": kmeans_iters,
            "cosine": lookup == "cosine",
        }
        widths = {"n_res_block": n_res_block, "n_res_channel": n_res_channel, "block": block}
        self.enc_b = Encoder(in_channel, channel, stride=4, **widths)
        self.enc_t = Encoder(channel, channel, stride=2, **widths)
        self.quantize_conv_t = nn.Conv2d(channel, embed_dim, 1)
        self.quantize_top = VectorQuantizer(embed_dim, n_embed, **quantizer_args)
        self.dec_t = Decoder(embed_dim, embed_dim, channel, stride=2, **widths)
        self.quantize_conv_b = nn.Conv2d(embed_dim + channel, embed_dim, 1)
        self.quantize_bottom = VectorQuantizer(embed_dim, n_embed, **quantizer_args)
        self.upsample_t = nn.ConvTranspose2d(embed_dim, embed_dim, 4, stride=2, padding=1)
        self.dec = Decoder(embed_dim * 2, in_channel, channel, stride=4, **widths)

    def forward(self, x: torch.Tensor) -> VQVAE2Output:
        """Encode, quantize (updating the codebooks in training mode) and decode ``x``.

        ``x``: ``(B, in_channel, H, W)``, any H, W >= 1 (padded to a multiple of 8 inside).
        """
        height, width = self._check_input(x)
        padded = self._pad(x)
        features_b = self.enc_b(padded)
        features_t = self.enc_t(features_b)
        quant_t, loss_t, codes_top = self.quantize_top(self.quantize_conv_t(features_t))
        joined = torch.cat([self.dec_t(quant_t), features_b], dim=1)
        quant_b, loss_b, codes_bottom = self.quantize_bottom(self.quantize_conv_b(joined))
        if self.training and self.bottom_dropout > 0:
            # These slices are decoded from the top codes alone: the top level learns the layout.
            keep = torch.rand(quant_b.shape[0], 1, 1, 1, device=quant_b.device) >= self.bottom_dropout
            quant_b = quant_b * keep.to(quant_b.dtype)
        reconstruction = self._decode_quantized(quant_t, quant_b)[..., :height, :width]
        return VQVAE2Output(reconstruction, loss_t + loss_b, codes_top, codes_bottom)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes of ``x`` ``(B, in_channel, H, W)`` -> ``(codes_top, codes_bottom)`` int64.

        Shapes as in :class:`VQVAE2Output`. Never updates the codebooks, even in training mode.
        """
        self._check_input(x)
        features_b = self.enc_b(self._pad(x))
        features_t = self.enc_t(features_b)
        codes_top = self.quantize_top.nearest_codes(self.quantize_conv_t(features_t))
        quant_t = self.quantize_top.embed_codes(codes_top)
        joined = torch.cat([self.dec_t(quant_t), features_b], dim=1)
        codes_bottom = self.quantize_bottom.nearest_codes(self.quantize_conv_b(joined))
        return codes_top, codes_bottom

    def decode_codes(
        self,
        codes_top: torch.Tensor,
        codes_bottom: torch.Tensor,
        output_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Images from codes: ``(B, h, w)`` and ``(B, 2h, 2w)`` int -> ``(B, in_channel, 8h, 8w)``.

        ``output_size=(H, W)`` crops to the original size when it was not a multiple of 8.
        """
        if codes_bottom.shape[-2:] != (2 * codes_top.shape[-2], 2 * codes_top.shape[-1]):
            raise ValueError(
                "bottom codes must be twice the top codes' size, got "
                f"{tuple(codes_top.shape)} and {tuple(codes_bottom.shape)}"
            )
        quant_t = self.quantize_top.embed_codes(codes_top)
        quant_b = self.quantize_bottom.embed_codes(codes_bottom)
        reconstruction = self._decode_quantized(quant_t, quant_b)
        if output_size is not None:
            reconstruction = reconstruction[..., : output_size[0], : output_size[1]]
        return reconstruction

    def _decode_quantized(self, quant_t: torch.Tensor, quant_b: torch.Tensor) -> torch.Tensor:
        upsampled_t = self.upsample_t(quant_t)
        return self.dec(torch.cat([upsampled_t, quant_b.to(upsampled_t.dtype)], dim=1))

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if x.ndim != 4 or x.shape[1] != self.in_channel:
            raise ValueError(
                f"expected images of shape (B, {self.in_channel}, H, W), got {tuple(x.shape)}"
            )
        return x.shape[-2], x.shape[-1]

    @staticmethod
    def _pad(x: torch.Tensor) -> torch.Tensor:
        pad_h = -x.shape[-2] % SIZE_MULTIPLE
        pad_w = -x.shape[-1] % SIZE_MULTIPLE
        if pad_h == 0 and pad_w == 0:
            return x
        return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
