"""The integer copy of the VQ-VAE's decoder: the picture the coding layers build on, the same
integers on every machine, thread count and batch, and 5-10x faster than the float64 decode
it replaces for new files (:class:`IntegerDecoder`).

- **Code vectors**: the top codebook as int8 (one scale for the codebook), the bottom one in the
  stream's unit (it joins the upsampled top level there).
- **Convolutions**: int8 weights with one scale per output channel; each input int8 — signed
  for the code vectors, unsigned (shifted by -128) after a ReLU — with one scale per layer;
  products summed exactly in int32 (:func:`mrivq.compression.portable.passes.int8_matmul`);
  outputs into the stream's unit (int64) by an integer multiplier and a right shift, the bias
  added before the shift. A 4x4 transposed convolution of stride 2 is four 2x2 convolutions,
  one per output phase (or, with one output channel, each input's product with all 16 taps,
  scattered). The two transposed convolutions' weights and the last one's input are 16 bits,
  a high and a low int8 part each (in 8 bits, by simulation one layer at a time, those three
  gave about seven times the picture's error variance of all the other layers together).
- **Units**: the stream's unit is its calibrated largest magnitude over 2**STREAM_BITS; the last
  convolution's input and the picture have units of their own, the same way.

A copy is made from the model's float32 weights and a few **calibrated ranges** (the largest
value at each quantised point, measured by :func:`calibrate` on the slices being encoded and
stored in the codes file), by correctly rounded IEEE-754 operations only (a largest magnitude,
a division, a product, a rounding): any machine makes the same integers from the same model and
ranges. The file stores the copy's fingerprint too, and a decode whose copy differs is refused
rather than misread. Models with GroupNorm blocks (``model.block: norm``) have no copy: their
coding layers keep the float64 picture.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mrivq.compression.portable.fixed_point import fingerprint_state, patches
from mrivq.compression.portable.passes import activate, int8_matmul, multiplier_of
from mrivq.nn.layers import ResBlock
from mrivq.nn.vqvae2 import VQVAE2

FORMAT = "int8-v1"  # the copy's arithmetic, as a codes file names it: another is refused by name
STREAM_BITS = 20  # the stream's (and the picture's) largest calibrated magnitude, in units
STREAM_LIMIT = 1 << 42  # the stream's clamp: only out-of-range slices come near it
SHIFT = 24  # requantising an activation: (x * multiplier) >> SHIFT
MAX_SHIFT = 30  # a convolution's output: (acc * multiplier + offset) >> shift, shift <= this
RANGE_LIMITS = (2.0 ** -40, 2.0 ** 40)  # a stored range outside these is refused


def has_copy(model: VQVAE2) -> bool:
    """Whether ``model``'s decoder has an integer copy: ReLU blocks (the report's and the default)
    and the stride-4 decoder every VQVAE2 has (3x3 convolution, blocks, ReLU, two transposed
    convolutions with a ReLU between)."""
    blocks = list(model.dec.blocks)
    kinds = [torch.nn.Conv2d, *[ResBlock] * (len(blocks) - 5), torch.nn.ReLU, torch.nn.ConvTranspose2d,
             torch.nn.ReLU, torch.nn.ConvTranspose2d]
    return len(blocks) >= 5 and all(type(b) is kind for b, kind in zip(blocks, kinds))


def range_names(model: VQVAE2) -> list[str]:
    """The calibrated ranges' names, in the order a codes file stores them."""
    n = len(list(model.dec.blocks)) - 5
    return ["stream", "input", *(f"block{i}.{j}" for i in range(n) for j in (1, 2)), "up1", "up2", "picture"]


# -- calibration (float, on the encoding machine only) ------------------------------------------

@torch.inference_mode()
def calibrate(model: VQVAE2, codes_top: torch.Tensor, codes_bottom: torch.Tensor) -> list[float]:
    """The largest value at each quantised point of ``model``'s decode of the codes ``(B, h, w)``
    and ``(B, 2h, 2w)``, float32 (any machine's: the file stores what this one measured), in the
    order of :func:`range_names`; a point that stayed at zero gets 1.0 (its values quantise to 0
    at any scale)."""
    blocks = list(model.dec.blocks)
    stream, relus = [], []
    device = model.quantize_top.embed.device
    quant_t = model.quantize_top.embed_codes(codes_top.long().to(device))
    quant_b = model.quantize_bottom.embed_codes(codes_bottom.long().to(device))
    up = model.upsample_t(quant_t)
    x0 = torch.cat([up, quant_b], dim=1)
    x = blocks[0](x0)
    stream += [up.abs().max(), quant_b.abs().max(), x.abs().max()]
    for block in blocks[1:-4]:
        relus.append(x.max())
        h = block.conv[1](F.relu(x))
        stream.append(h.abs().max())
        relus.append(h.max())
        x = x + block.conv[3](F.relu(h))
        stream.append(x.abs().max())
    relus.append(x.max())
    h = blocks[-3](F.relu(x))
    stream.append(h.abs().max())
    relus.append(h.max())
    picture = blocks[-1](F.relu(h))
    values = [max(stream), x0.abs().max(), *relus, picture.abs().max()]
    return [float(v) if float(v) > 0 else 1.0 for v in values]


# -- the copy ----------------------------------------------------------------------------------

def _layer(weight: torch.Tensor, bias: torch.Tensor | None, input_scale: float, output_unit: float, *,
           shifted: bool, transposed: bool = False, input_bits: int = 8, weight_bits: int = 8) -> dict:
    """One convolution's integers. Weights per output channel in ``weight_bits`` (8, or 16 as a high
    and a low int8 part) as the matrices :func:`_columns` multiplies; the input in ``input_bits``
    (8, or 16 as two parts too). Per output channel the multiplier and the offsets (one per
    matrix) that take the exact sums into ``output_unit`` (the bias, the rounding half and the
    inputs' shift by -128 folded in), at the largest ``shift`` that keeps every sum inside int64.

    A 4x4 transposed convolution of stride 2 is four 2x2 convolutions, one per output phase
    (``layout: phases``), or, with fewer than 8 outputs, one product of each input position with
    all 16 taps, scattered onto the output (``layout: scatter``: far fewer columns to build)."""
    w = weight.detach().double().cpu()
    w = w.transpose(0, 1) if transposed else w  # (N, C, k, k)
    n, channels = w.shape[:2]
    largest = 127 if weight_bits == 8 else 32639  # a 16-bit weight's high byte stays within int8
    scale = w.abs().amax(dim=(1, 2, 3)).clamp(min=1e-30) / largest  # (N,)
    q = torch.round(w / scale[:, None, None, None]).long()
    layout = "conv" if not transposed else "phases" if n >= 8 else "scatter"
    if layout == "phases":  # output phase (r, s) reads taps 3 - r - 2 di, 3 - s - 2 dj of inputs (i + r + di - 1, ..)
        kernels = [q[:, :, [3 - r, 1 - r]][:, :, :, [3 - s, 1 - s]] for r in (0, 1) for s in (0, 1)]
        matrices = [k.permute(2, 3, 1, 0).reshape(-1, n) for k in kernels]  # (4 C, N)
    elif layout == "scatter":  # (C, 16 N): column (4 ky + kx) N + n
        matrices = [q.permute(1, 2, 3, 0).reshape(channels, 16 * n)]
    else:
        matrices = [q.permute(2, 3, 1, 0).reshape(-1, n)]  # (k k C, N)
    zero = (128 if input_bits == 8 else 32896) if shifted else 0  # what the int8 inputs are shifted by
    taps = 4 * channels if transposed else matrices[0].shape[0]  # the most products in one output's sum
    bound = taps * (1 << input_bits) * (largest + 1)
    b = bias.detach().double().cpu() if bias is not None else torch.zeros(n, dtype=torch.float64)
    for shift in range(MAX_SHIFT, 0, -1):
        multiplier = torch.round(scale * input_scale / output_unit * float(1 << shift)).long()
        offset = torch.round(b / output_unit * float(1 << shift)).long() + (1 << (shift - 1))
        if int(multiplier.abs().max()) * bound + int(offset.abs().max()) < 1 << 61:
            break
    else:
        raise ValueError("its weights or ranges put a convolution beyond int64")
    corrections = [zero * m.sum(dim=0) for m in matrices]
    return {"layout": layout, "kernel": int(w.shape[-1]), "shifted": shifted, "input_bits": input_bits,
            "weights": [[m.to(torch.int8)] if weight_bits == 8 else
                        [((m - (m + 128) % 256 + 128) // 256).to(torch.int8), ((m + 128) % 256 - 128).to(torch.int8)]
                        for m in matrices],
            "multiplier": multiplier, "shift": shift,
            "offsets": [offset] if layout == "scatter" else [offset + c * multiplier for c in corrections],
            "correction": corrections[0] if layout == "scatter" else None}


def _columns(a: torch.Tensor, layer: dict, phase: int) -> torch.Tensor:
    """int8 ``(B, H, W, C)`` -> the ``(B H W, taps C)`` columns of matrix ``phase``: each position's
    3x3 or 2x2 neighbourhood (the input's zero, -128 when shifted, beyond the edges), or the
    position alone."""
    zero = -128 if layer["shifted"] else 0
    if layer["layout"] == "conv" and layer["kernel"] == 3:
        return patches(a, 3, pad=1, value=zero).reshape(-1, 9 * a.shape[-1])
    if layer["layout"] == "phases":
        r, s = divmod(phase, 2)
        padded = F.pad(a, (0, 0, 1, 1, 1, 1), value=zero)
        height, width = a.shape[1], a.shape[2]
        return torch.cat([padded[:, r + di:r + di + height, s + dj:s + dj + width] for di in (0, 1) for dj in (0, 1)],
                         dim=-1).reshape(-1, 4 * a.shape[-1])
    return a.reshape(-1, a.shape[-1])


def _sums(columns: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    """The exact sums (int64) of the input's columns (one part, or its high and low byte's) with the
    weights (one part, or their high and low byte's)."""
    out = None
    for part, a_shift in zip(columns, [8, 0][2 - len(columns):]):
        for matrix, w_shift in zip(weights, [8, 0][2 - len(weights):]):
            product = int8_matmul(part, matrix).long()
            if a_shift + w_shift:
                product.bitwise_left_shift_(a_shift + w_shift)
            out = product if out is None else out.add_(product)
    return out


def _convolve(a, layer: dict) -> torch.Tensor:
    """int8 ``(B, H, W, C)`` (a 16-bit input: its high and low bytes) -> int64 ``(B, H, W, N)``
    (``(B, 2H, 2W, N)`` transposed) in the output's unit."""
    parts = a if isinstance(a, tuple) else (a,)
    batch, height, width, _ = parts[0].shape
    outs = []
    for phase, (weights, offset) in enumerate(zip(layer["weights"], layer["offsets"])):
        acc = _sums([_columns(part, layer, phase) for part in parts], weights)
        if layer["layout"] == "scatter":  # input (i, j), tap (ky, kx) -> output (2i - 1 + ky, 2j - 1 + kx)
            acc = acc.add_(layer["correction"]).reshape(batch, height, width, 4, 4, -1)
            out = acc.new_zeros(batch, 2 * height + 2, 2 * width + 2, acc.shape[-1])
            for ky in range(4):
                for kx in range(4):
                    out[:, ky:ky + 2 * height:2, kx:kx + 2 * width:2] += acc[:, :, :, ky, kx]
            acc = out[:, 1:-1, 1:-1].reshape(-1, acc.shape[-1])
        outs.append(acc.mul_(layer["multiplier"]).add_(offset).bitwise_right_shift_(layer["shift"]))
    if layer["layout"] == "phases":  # (r, s) interleaved
        out = torch.stack(outs).reshape(2, 2, batch, height, width, -1).permute(2, 3, 0, 4, 1, 5)
        return out.reshape(batch, 2 * height, 2 * width, -1)
    scale = 1 if layer["layout"] == "conv" else 2
    return outs[0].reshape(batch, scale * height, scale * width, -1)


def _activate_wide(x: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU of the stream ``x`` (int64) requantised to 16 bits (``round(x * m / 2**SHIFT)`` clamped
    to [0, 65535]), as its high and low bytes, each shifted by -128 to int8."""
    top = ((65535 << SHIFT) // max(multiplier, 1)) + 1
    u = x.clamp(-1, top).mul_(multiplier).add_(1 << (SHIFT - 1)).bitwise_right_shift_(SHIFT).clamp_(0, 65535)
    return (u >> 8).sub_(128).to(torch.int8), (u & 255).sub_(128).to(torch.int8)


def _signed(x: torch.Tensor, multiplier: int) -> torch.Tensor:
    """The stream ``x`` (int64) as signed int8: ``round(x * m / 2**SHIFT)`` clamped to [-127, 127]."""
    top = ((128 << SHIFT) // max(multiplier, 1)) + 1
    scaled = x.clamp(-top, top).mul_(multiplier).add_(1 << (SHIFT - 1)).bitwise_right_shift_(SHIFT)
    return scaled.clamp_(-127, 127).to(torch.int8)


class IntegerDecoder:
    """The decode of :class:`VQVAE2` codes in integers: ``pictures(codes_top, codes_bottom)``, the
    same float64 values (integers times one unit) on every machine. Made from the model and the
    ranges :func:`calibrate` measured (a codes file's, so checked: ``ValueError`` for ranges that
    do not belong to the model or would put the arithmetic beyond int64)."""

    def __init__(self, model: VQVAE2, ranges: list[float]) -> None:
        names = range_names(model)
        if not has_copy(model):
            raise ValueError("its model's decoder has no integer copy (GroupNorm blocks)")
        if len(ranges) != len(names) or not all(RANGE_LIMITS[0] <= float(r) <= RANGE_LIMITS[1] for r in ranges):
            raise ValueError(f"its picture ranges are not {len(names)} numbers from 2**-40 to 2**40")
        self.ranges = [float(r) for r in ranges]
        self.state = _decoder_state(model, dict(zip(names, self.ranges)))
        self.fingerprint = fingerprint_state(self.state)

    @torch.inference_mode()
    def pictures(self, codes_top: torch.Tensor, codes_bottom: torch.Tensor) -> np.ndarray:
        """Codes ``(B, h, w)``, ``(B, 2h, 2w)`` int -> float64 ``(B, 8h, 8w)``: the model's output
        (normalised intensities), from integers only (the one float product made outside torch)."""
        s, limit = self.state, STREAM_LIMIT
        up = _convolve(s["top"][codes_top.long().cpu()], s["up"])
        x = torch.cat([up, s["bottom"][codes_bottom.long().cpu()]], dim=-1).clamp_(-limit, limit)
        x = _convolve(_signed(x, s["input"]), s["first"]).clamp_(-limit, limit)
        for block in s["blocks"]:
            h = _convolve(activate(x, block["relu1"]), block["conv1"]).clamp_(-limit, limit)
            x.add_(_convolve(activate(h, block["relu2"]), block["conv2"])).clamp_(-limit, limit)
        h = _convolve(activate(x, s["relu_up1"]), s["up1"]).clamp_(-limit, limit)
        out = _convolve(_activate_wide(h, s["relu_up2"]), s["up2"])
        return out[..., 0].numpy().astype(np.float64) * s["picture_unit"]


def _decoder_state(model: VQVAE2, ranges: dict[str, float]) -> dict:
    """Every integer of the copy, from the model's weights and the calibrated ``ranges``."""
    blocks = list(model.dec.blocks)
    stream_unit = ranges["stream"] / (1 << STREAM_BITS)
    picture_unit = ranges["picture"] / (1 << STREAM_BITS)
    wide_unit = ranges["up2"] / (1 << STREAM_BITS)
    top = model.quantize_top.embed.detach().double().cpu()
    top_scale = float(top.abs().max()) / 127 or 1.0
    relu = lambda name: ranges[name] / 255  # float per uint8 step after a ReLU
    state = {
        "format": FORMAT,
        "top": torch.round(top / top_scale).to(torch.int8),
        "bottom": torch.round(model.quantize_bottom.embed.detach().double().cpu() / stream_unit).long(),
        "up": _layer(model.upsample_t.weight, model.upsample_t.bias, top_scale, stream_unit,
                     shifted=False, transposed=True),
        "input": _activation(stream_unit, ranges["input"] / 127),
        "first": _layer(blocks[0].weight, blocks[0].bias, ranges["input"] / 127, stream_unit, shifted=False),
        "blocks": [{"relu1": _activation(stream_unit, relu(f"block{i}.1")),
                    "conv1": _layer(b.conv[1].weight, b.conv[1].bias, relu(f"block{i}.1"), stream_unit, shifted=True),
                    "relu2": _activation(stream_unit, relu(f"block{i}.2")),
                    "conv2": _layer(b.conv[3].weight, b.conv[3].bias, relu(f"block{i}.2"), stream_unit, shifted=True)}
                   for i, b in enumerate(blocks[1:-4])],
        "relu_up1": _activation(stream_unit, relu("up1")),
        # the last convolution's input in 16 bits, in a unit of its own
        "up1": _layer(blocks[-3].weight, blocks[-3].bias, relu("up1"), wide_unit, shifted=True, transposed=True,
                      weight_bits=16),
        "relu_up2": _activation(wide_unit, ranges["up2"] / 65535),
        "up2": _layer(blocks[-1].weight, blocks[-1].bias, ranges["up2"] / 65535, picture_unit, shifted=True,
                      transposed=True, input_bits=16, weight_bits=16),
        "picture_unit": picture_unit,
    }
    if float(state["bottom"].abs().max()) > STREAM_LIMIT:
        raise ValueError("its picture ranges put the bottom code vectors beyond the stream's range")
    return state


def _activation(stream_unit: float, step: float) -> int:
    """The multiplier that requantises the stream to int8 steps of ``step``; ValueError beyond 2**40."""
    multiplier = multiplier_of(stream_unit / step)
    if not 0 < multiplier <= 1 << 40:
        raise ValueError("its picture ranges put an activation beyond the integer arithmetic's range")
    return multiplier
