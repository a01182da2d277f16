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
  one per output phase.
- **Units**: the stream's unit is its calibrated largest magnitude over 2**STREAM_BITS; the
  picture's, the picture's largest over 2**STREAM_BITS.

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
    quant_t = model.quantize_top.embed_codes(codes_top)
    quant_b = model.quantize_bottom.embed_codes(codes_bottom)
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
           shifted: bool, transposed: bool = False) -> dict:
    """One convolution's integers: int8 weight matrices laid out as :func:`_columns` makes columns
    (one, or one per output phase of a transposed convolution), and per output channel the
    multiplier and offset that take the int32 products into ``output_unit`` (the inputs'
    -128 shift, the bias and the rounding half folded into the offset) at the largest ``shift``
    that keeps every sum inside int64."""
    w = weight.detach().double().cpu()
    if transposed:  # (C, N, 4, 4): output phase (r, s) reads taps 3 - r - 2 di, 3 - s - 2 dj
        w = w.transpose(0, 1)
    n = w.shape[0]
    scale = w.abs().amax(dim=(1, 2, 3)).clamp(min=1e-30) / 127  # (N,)
    q = torch.round(w / scale[:, None, None, None]).clamp(-127, 127)  # (N, C, k, k)
    if transposed:
        phases = [q[:, :, [3 - r, 1 - r]][:, :, :, [3 - s, 1 - s]] for r in (0, 1) for s in (0, 1)]
    else:
        phases = [q]
    matrices = [p.permute(2, 3, 1, 0).reshape(-1, n) for p in phases]  # (taps x C, N)
    b = bias.detach().double().cpu() if bias is not None else torch.zeros(n, dtype=torch.float64)
    bound = max(len(m) for m in matrices) * 128 * 127 * 2  # |acc| and the shift's correction
    for shift in range(MAX_SHIFT, 0, -1):
        multiplier = torch.round(scale * input_scale / output_unit * float(1 << shift)).long()
        offset = torch.round(b / output_unit * float(1 << shift)).long()
        if int(multiplier.abs().max()) * bound + int(offset.abs().max()) < 1 << 61:
            break
    else:
        raise ValueError("its weights or ranges put a convolution beyond int64")
    offsets = [offset + (1 << (shift - 1)) + (128 * m.sum(dim=0) * multiplier if shifted else 0) for m in matrices]
    return {"weights": [m.to(torch.int8) for m in matrices], "multiplier": multiplier,
            "offsets": [o.long() for o in offsets], "shift": shift, "shifted": shifted,
            "kernel": "transposed" if transposed else int(w.shape[-1])}


def _columns(a: torch.Tensor, layer: dict) -> list[torch.Tensor]:
    """int8 ``(B, H, W, C)`` -> one ``(B H W, taps C)`` matrix per output phase: each position's
    neighbourhood, the input's zero (-128 when shifted) beyond the edges."""
    zero = -128 if layer["shifted"] else 0
    channels = a.shape[-1]
    if layer["kernel"] == 1:
        return [a.reshape(-1, channels)]
    if layer["kernel"] == 3:
        return [patches(a, 3, pad=1, value=zero).reshape(-1, 9 * channels)]
    padded = F.pad(a, (0, 0, 1, 1, 1, 1), value=zero)
    height, width = a.shape[1], a.shape[2]
    return [torch.cat([padded[:, r + di:r + di + height, s + dj:s + dj + width] for di in (0, 1) for dj in (0, 1)],
                      dim=-1).reshape(-1, 4 * channels) for r in (0, 1) for s in (0, 1)]


def _convolve(a: torch.Tensor, layer: dict) -> torch.Tensor:
    """int8 ``(B, H, W, C)`` -> int64 ``(B, H, W, N)`` (``(B, 2H, 2W, N)`` transposed) in the output's unit."""
    batch, height, width, _ = a.shape
    outs = []
    for columns, weights, offset in zip(_columns(a, layer), layer["weights"], layer["offsets"]):
        acc = int8_matmul(columns, weights).long().mul_(layer["multiplier"]).add_(offset)
        outs.append(acc.bitwise_right_shift_(layer["shift"]).reshape(batch, height, width, -1))
    if len(outs) == 1:
        return outs[0]
    out = torch.stack(outs, dim=3).reshape(batch, height, width, 2, 2, -1)  # phases (r, s)
    return out.permute(0, 1, 3, 2, 4, 5).reshape(batch, 2 * height, 2 * width, -1)


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
        out = _convolve(activate(h, s["relu_up2"]), s["up2"])
        return out[..., 0].numpy().astype(np.float64) * s["picture_unit"]


def _decoder_state(model: VQVAE2, ranges: dict[str, float]) -> dict:
    """Every integer of the copy, from the model's weights and the calibrated ``ranges``."""
    blocks = list(model.dec.blocks)
    stream_unit = ranges["stream"] / (1 << STREAM_BITS)
    picture_unit = ranges["picture"] / (1 << STREAM_BITS)
    top = model.quantize_top.embed.detach().double().cpu()
    top_scale = float(top.abs().max()) / 127 or 1.0
    relu = lambda name: ranges[name] / 255  # noqa: E731 - float per uint8 step after a ReLU
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
        "up1": _layer(blocks[-3].weight, blocks[-3].bias, relu("up1"), stream_unit, shifted=True, transposed=True),
        "relu_up2": _activation(stream_unit, relu("up2")),
        "up2": _layer(blocks[-1].weight, blocks[-1].bias, relu("up2"), picture_unit, shifted=True, transposed=True),
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
