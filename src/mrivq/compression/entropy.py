"""Codes as bitstreams: range coding (``constriction``) under code frequencies or under the prior.

Four coders, each an encoder and the decoder that undoes it exactly:

- **frequencies**: every code of a level is coded under that level's code counts over the coded
  set (the counts travel with the stream): :func:`encode_with_frequencies`,
  :func:`decode_with_frequencies`. One stream: every top code slice by slice, then every bottom
  code.
- **passes** (a pass prior, the default): each grid's codes pass by pass under the weights of
  the prior's integer copy (:class:`mrivq.nn.integer_prior.IntegerPassPrior`), integers that
  are the same on any machine, thread count, batch or device, so any of them decodes; one
  stream per slice: :func:`encode_in_passes`, :func:`decode_in_passes`.
- **raster** (a transformer prior): every code in raster order under the weights of the prior's
  integer copy (:class:`mrivq.nn.integer_transformer.IntegerCodePrior`) given the codes before
  it, the same integers on any machine; one stream per slice: the encoder teacher-forced in
  chunks of positions, the decoder one position at a time: :func:`encode_in_raster`,
  :func:`decode_in_raster`.
- **sequential** (a transformer prior saved before integer copies existed): every code under the
  prior's float probabilities given the codes before it. Encoder and decoder obtain each
  position's probabilities through one sequential path (:meth:`mrivq.nn.prior.CodeTransformer.cached_logits`, one position at a
  time, slices in fixed batches of ``batch_size``, one CPU thread), turned into the coder's
  integer frequencies the same way on both sides, so the decoder rebuilds the codes bit for bit
  on the same kind of machine and device only: :func:`encode_with_prior`,
  :func:`decode_with_prior`. One stream: every top code batch by batch, then every bottom code.

Streams are uint32 words. *raw* bits are ``log2(n_embed)`` per code
(:func:`raw_bits_per_pixel`): what fixed-width indices would take.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from mrivq.nn.integer_prior import IntegerPassPrior, weights_from_logits
from mrivq.nn.integer_transformer import CHUNK, IntegerCodePrior
from mrivq.nn.pass_prior import PassPrior
from mrivq.nn.prior import CodePrior, NonFiniteProbabilities

PRIOR_BATCH = 16  # slices coded together under a transformer prior (the decoder must use the same)
#: Slices coded together under a pass prior (any batch decodes): 4 ran 1.5x as fast as 16 on
#: 2 cores, whose caches then hold the residual stream (benchmarks/portable_prior.py).
PASS_BATCH = 4


def raw_bits_per_pixel(image_size: tuple[int, int], top_shape: tuple[int, int],
                       bottom_shape: tuple[int, int], n_embed_top: int, n_embed_bottom: int) -> float:
    """Bits per pixel of the codes stored as fixed-width indices (log2 of each codebook size)."""
    bits = (math.prod(top_shape) * math.log2(n_embed_top)
            + math.prod(bottom_shape) * math.log2(n_embed_bottom))
    return bits / math.prod(image_size)


def _categorical():
    import constriction  # imported when coding: the model and compression layers stay light to import

    return constriction.stream.model.Categorical, constriction.stream.queue


# ---------------------------------------------------------------------------------------
# Under code frequencies
# ---------------------------------------------------------------------------------------

def code_count_table(codes_top: np.ndarray, codes_bottom: np.ndarray, n_embed: int) -> np.ndarray:
    """``(2, n_embed)`` uint32: how often each code occurs at the top and at the bottom."""
    return np.stack([np.bincount(np.asarray(c).ravel(), minlength=n_embed) for c in (codes_top, codes_bottom)]
                    ).astype(np.uint32)


def _frequencies(counts: np.ndarray) -> np.ndarray:
    counts = counts.astype(np.float64)
    return counts / counts.sum()


def encode_with_frequencies(codes_top: np.ndarray, codes_bottom: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Range-code ``codes_top`` ``(N, h, w)`` then ``codes_bottom`` ``(N, 2h, 2w)`` under each level's
    ``counts`` (:func:`code_count_table` of the same codes); returns the stream (uint32 words)."""
    categorical, queue = _categorical()
    encoder = queue.RangeEncoder()
    for codes, level_counts in zip((codes_top, codes_bottom), counts):
        encoder.encode(np.ascontiguousarray(codes, dtype=np.int32).ravel(),
                       categorical(_frequencies(level_counts), perfect=False))
    return encoder.get_compressed()


def decode_with_frequencies(words: np.ndarray, counts: np.ndarray, n: int, top_grid: tuple[int, int],
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Undo :func:`encode_with_frequencies`: ``n`` top grids ``top_grid`` and bottom grids twice as
    large, int64."""
    categorical, queue = _categorical()
    decoder = queue.RangeDecoder(np.ascontiguousarray(words, dtype=np.uint32))
    grids = (tuple(top_grid), (2 * top_grid[0], 2 * top_grid[1]))
    return tuple(decoder.decode(categorical(_frequencies(level_counts), perfect=False), n * math.prod(grid))
                 .astype(np.int64).reshape(n, *grid) for grid, level_counts in zip(grids, counts))


def ideal_bits(counts: np.ndarray) -> float:
    """``-sum log2 p`` of the codes these per-level ``counts`` describe, under their own frequencies:
    the length no coder of them beats."""
    bits = 0.0
    for level_counts in np.asarray(counts, dtype=np.float64):
        used = level_counts[level_counts > 0]
        bits -= float((used * np.log2(used / used.sum())).sum())
    return bits


# ---------------------------------------------------------------------------------------
# Under the prior
# ---------------------------------------------------------------------------------------

#: ``code(level, probabilities (B, K) float64, first_slice, position) -> codes (B,) int64``:
#: the encoder codes the true codes and returns them, the decoder returns what it decoded.
Coder = Callable[[str, np.ndarray, int, int], np.ndarray]


@torch.inference_mode()
def _prior_pass(prior: CodePrior, n: int, batch_size: int, code: Coder) -> tuple[np.ndarray, np.ndarray]:
    """The one sequential path both prior coders take (see the module docstring)."""
    prior.eval()
    device = next(prior.parameters()).device
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order on both sides, and faster for one token
    tops, bottoms = [], []
    try:
        for lo in range(0, n, batch_size):
            size = min(batch_size, n - lo)
            grids = []
            condition = None
            for level, transformer in (("top", prior.top), ("bottom", prior.bottom)):
                if level == "bottom":
                    condition = prior.condition(grids[0])
                cache = transformer.new_cache(size)
                out = torch.zeros(size, transformer.length, dtype=torch.long, device=device)
                for t in range(transformer.length):
                    logits = transformer.cached_logits(out, t, cache, condition)[:, 0]
                    probs = torch.softmax(logits.double(), dim=-1).cpu().numpy()
                    if not np.isfinite(probs).all():
                        raise NonFiniteProbabilities("the prior's probabilities hold NaN or Inf (damaged weights)")
                    out[:, t] = torch.as_tensor(code(level, probs, lo, t), dtype=torch.long, device=device)
                grids.append(out.reshape(size, *transformer.grid))
            tops.append(grids[0].cpu().numpy())
            bottoms.append(grids[1].cpu().numpy())
    finally:
        torch.set_num_threads(threads)
    return np.concatenate(tops), np.concatenate(bottoms)


def encode_with_prior(prior: CodePrior, codes_top: np.ndarray, codes_bottom: np.ndarray, *,
                      batch_size: int = PRIOR_BATCH) -> np.ndarray:
    """Range-code ``codes_top`` ``(N, h, w)`` and ``codes_bottom`` ``(N, 2h, 2w)`` under ``prior``;
    returns the stream (uint32 words). :func:`decode_with_prior` with the same prior and
    ``batch_size`` on the same kind of machine and device gives the codes back."""
    categorical, queue = _categorical()
    encoder = queue.RangeEncoder()
    truth = {"top": np.asarray(codes_top, dtype=np.int32).reshape(len(codes_top), -1),
             "bottom": np.asarray(codes_bottom, dtype=np.int32).reshape(len(codes_bottom), -1)}
    model = categorical(perfect=False)

    def code(level, probs, lo, t):
        symbols = np.ascontiguousarray(truth[level][lo:lo + len(probs), t])
        encoder.encode(symbols, model, probs)
        return symbols

    _prior_pass(prior, len(codes_top), batch_size, code)
    return encoder.get_compressed()


def decode_with_prior(prior: CodePrior, words: np.ndarray, n: int, *,
                      batch_size: int = PRIOR_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Undo :func:`encode_with_prior`: ``n`` top and bottom grids, int64."""
    categorical, queue = _categorical()
    decoder = queue.RangeDecoder(np.ascontiguousarray(words, dtype=np.uint32))
    model = categorical(perfect=False)
    return _prior_pass(prior, n, batch_size, lambda level, probs, lo, t: decoder.decode(model, probs))


# ---------------------------------------------------------------------------------------
# Under the portable prior, in passes
# ---------------------------------------------------------------------------------------

#: ``code(level, probabilities (P, K) float64, slice, step) -> codes (P,) int64`` for the ``P``
#: positions of pass ``step`` of one slice's grid (raster order).
PassCoder = Callable[[str, np.ndarray, int, int], np.ndarray]


def _passes(prior: IntegerPassPrior, n: int, batch_size: int, code: PassCoder) -> tuple[np.ndarray, np.ndarray]:
    """The one path both pass coders take: each batch's top grids pass by pass, then its bottom
    grids given the top. The integer copy's frequencies do not depend on the batch, the threads
    or the device, and each slice has its own stream, so encoder and decoder may choose those
    freely."""
    return _in_batches(n, batch_size, prior.exp_table.device,
                       lambda lo, size: _batch_in_passes(prior, lo, size, code))


def _in_batches(n: int, batch_size: int, device: torch.device, run, in_flight: int = PRIOR_BATCH,
                ) -> tuple[np.ndarray, np.ndarray]:
    """``run(lo, size) -> (top, bottom)`` over the batches of ``n`` slices, concatenated. On the CPU,
    batches run side by side, one per thread (``torch.get_num_threads()``, at most ``in_flight``
    slices at once: within the memory a prior checkpoint is checked for), each op on one thread:
    small batches keep the integer working set in the caches. A progress bar counts the slices
    (on a terminal: a transformer prior takes minutes for a few hundred)."""
    starts = range(0, n, batch_size)
    workers = 1
    if device.type == "cpu":
        workers = max(1, min(torch.get_num_threads(), len(starts), in_flight // batch_size))
    bar = tqdm(total=n, desc="prior coder", unit="slice", disable=None, leave=False)

    def counted(lo: int):
        size = min(batch_size, n - lo)
        part = run(lo, size)
        bar.update(size)
        return part

    try:
        if workers > 1:
            with _single_threaded_ops():
                pool = ThreadPoolExecutor(workers)
                try:
                    parts = list(pool.map(counted, starts))
                finally:  # on an error or Ctrl-C, the batches not yet started are dropped
                    pool.shutdown(wait=True, cancel_futures=True)
        else:
            parts = [counted(lo) for lo in starts]
    finally:
        bar.close()
    return np.concatenate([top for top, _ in parts]), np.concatenate([bottom for _, bottom in parts])


@contextlib.contextmanager
def _single_threaded_ops():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def _batch_in_passes(prior: IntegerPassPrior, lo: int, size: int, code: PassCoder) -> tuple[np.ndarray, np.ndarray]:
    """Slices ``lo`` to ``lo + size`` of :func:`_passes`: their top and bottom codes."""
    device = prior.exp_table.device
    grids = {"top": prior.top_grid, "bottom": (2 * prior.top_grid[0], 2 * prior.top_grid[1])}
    out = {}
    for level in ("top", "bottom"):
        condition = prior.condition(torch.as_tensor(out["top"], device=device)) if level == "bottom" else None
        codes = torch.zeros(size, *grids[level], dtype=torch.long, device=device)
        for step in range(prior.passes[level]):
            symbols = np.stack([code(level, weights, lo + i, step)  # weights: (P, K) float64
                                for i, weights in enumerate(prior.weights(level, codes, step, condition))])
            codes[:, prior.order(level) == step] = torch.as_tensor(symbols, dtype=torch.long, device=device)
        out[level] = codes.cpu().numpy()
    return out["top"], out["bottom"]


def encode_in_passes(prior: IntegerPassPrior, codes_top: np.ndarray, codes_bottom: np.ndarray, *,
                     batch_size: int = PASS_BATCH) -> np.ndarray:
    """Range-code the codes under the integer copy of a pass prior, each slice in its own stream;
    returns the uint32 words: the ``N`` streams' lengths, then the streams one after another.
    :func:`decode_in_passes` gives the codes back on any machine, with any batch size."""
    truth = {"top": np.asarray(codes_top, dtype=np.int32), "bottom": np.asarray(codes_bottom, dtype=np.int32)}
    orders = {level: prior.order(level).cpu().numpy() for level in truth}

    def run(encode):
        def code(level, probs, i, step):
            return encode(i, np.ascontiguousarray(truth[level][i][orders[level] == step]), probs)
        _passes(prior, len(codes_top), batch_size, code)

    return _encoded_per_slice(len(codes_top), run)


def _encoded_per_slice(n: int, run) -> np.ndarray:
    """``run(encode)``, where ``encode(i, symbols, weights)`` range-codes ``symbols`` into slice
    ``i``'s stream (and returns them); then the ``n`` streams' lengths and the streams."""
    categorical, queue = _categorical()
    model = categorical(perfect=False)
    encoders = [queue.RangeEncoder() for _ in range(n)]

    def encode(i, symbols, probs):
        encoders[i].encode(symbols, model, probs)
        return symbols

    run(encode)
    streams = [encoder.get_compressed() for encoder in encoders]
    return np.concatenate([np.array([len(s) for s in streams], dtype=np.uint32), *streams])


def _decoded_per_slice(words: np.ndarray, n: int, run) -> tuple[np.ndarray, np.ndarray]:
    """``run(decode)``, where ``decode(i, weights)`` decodes slice ``i``'s next codes from its stream
    in ``words`` (:func:`split_streams`); its codes, once every stream is used up exactly."""
    categorical, queue = _categorical()
    model = categorical(perfect=False)
    decoders = [queue.RangeDecoder(np.ascontiguousarray(s)) for s in split_streams(words, n)]
    codes = run(lambda i, probs: decoders[i].decode(model, probs))
    if not all(decoder.maybe_exhausted() for decoder in decoders):
        raise ValueError("a slice's stream holds more words than its codes")
    return codes


def split_streams(words: np.ndarray, n: int) -> list[np.ndarray]:
    """The ``n`` per-slice streams of :func:`encode_in_passes`'s words; ``ValueError`` when the
    lengths do not add up to the words that follow them."""
    words = np.asarray(words, dtype=np.uint32)
    if words.size < n:
        raise ValueError("fewer words than slices")
    lengths = words[:n].astype(np.int64)
    if int(lengths.sum()) != words.size - n:
        raise ValueError("the per-slice stream lengths do not add up to the stream")
    ends = n + np.cumsum(lengths)
    return [words[end - length:end] for end, length in zip(ends, lengths)]


def decode_in_passes(prior: IntegerPassPrior, words: np.ndarray, n: int, *,
                     batch_size: int = PASS_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Undo :func:`encode_in_passes`: ``n`` top and bottom grids, int64."""
    return _decoded_per_slice(words, n, lambda decode: _passes(
        prior, n, batch_size, lambda level, probs, i, step: decode(i, probs)))


# ---------------------------------------------------------------------------------------
# Under the portable transformer prior, in raster order
# ---------------------------------------------------------------------------------------

#: Slices a raster coder runs together: the encoder, teacher-forced chunk by chunk, is fastest
#: with few; the decoder, one position at a time, spreads each step's fixed cost over more.
RASTER_ENCODE_BATCH, RASTER_DECODE_BATCH = 4, 16
#: Slices the raster decoder has in flight (the encoder: PRIOR_BATCH): its key/value caches hold
#: the top grid and only the window of the bottom, 4 MiB a slice for the default prior (both
#: within what a prior checkpoint is checked for: engine.checkpoint).
RASTER_IN_FLIGHT = 32


def _raster(prior: IntegerCodePrior, n: int, batch_size: int, code: PassCoder,
            known: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The one path both raster coders take: each batch's top grid in raster order, then its
    bottom grid given the top. ``code(level, weights (P, K), slice, position)`` codes the ``P``
    positions from ``position`` of one slice. With the codes ``known`` (``{level: (N, L)}``: the
    encoder), CHUNK positions at a time, teacher-forced; else one position at a time, each
    given the codes decoded before it. The copy's integers do not depend on the batch, the
    chunk, the threads or the device, so encoder and decoder choose them freely."""
    return _in_batches(n, batch_size, prior.exp_table.device,
                       lambda lo, size: _batch_in_raster(prior, lo, size, code, known),
                       PRIOR_BATCH if known is not None else RASTER_IN_FLIGHT)


@torch.inference_mode()
def _batch_in_raster(prior: IntegerCodePrior, lo: int, size: int, code: PassCoder,
                     known: dict[str, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    device = prior.exp_table.device
    chunk = 1 if known is None else CHUNK
    out = {}
    for level in ("top", "bottom"):
        net = getattr(prior, level)
        condition = prior.condition(torch.as_tensor(out["top"], device=device)) if level == "bottom" else None
        codes = torch.zeros(size, net.length, dtype=torch.long, device=device)
        if known is not None:
            codes[:] = torch.as_tensor(known[level][lo:lo + size], dtype=torch.long, device=device)
        cache = net.new_cache(size, one_at_a_time=known is None)
        for position in range(0, net.length, chunk):
            length = min(chunk, net.length - position)
            weights = weights_from_logits(net.logits(codes, position, length, cache, condition), prior.coder_table)
            symbols = np.stack([code(level, w, lo + i, position) for i, w in enumerate(weights)])
            codes[:, position:position + length] = torch.as_tensor(symbols, dtype=torch.long, device=device)
        out[level] = codes.reshape(size, *net.grid).cpu().numpy()
    return out["top"], out["bottom"]


def encode_in_raster(prior: IntegerCodePrior, codes_top: np.ndarray, codes_bottom: np.ndarray, *,
                     batch_size: int = RASTER_ENCODE_BATCH) -> np.ndarray:
    """Range-code the codes in raster order under the integer copy of a transformer prior, each
    slice in its own stream, in :func:`encode_in_passes`'s layout (the lengths, then the streams).
    :func:`decode_in_raster` gives the codes back on any machine, with any batch size."""
    truth = {"top": np.asarray(codes_top, dtype=np.int32).reshape(len(codes_top), -1),
             "bottom": np.asarray(codes_bottom, dtype=np.int32).reshape(len(codes_bottom), -1)}

    def run(encode):
        def code(level, probs, i, position):
            return encode(i, np.ascontiguousarray(truth[level][i, position:position + len(probs)]), probs)
        _raster(prior, len(codes_top), batch_size, code, truth)

    return _encoded_per_slice(len(codes_top), run)


def decode_in_raster(prior: IntegerCodePrior, words: np.ndarray, n: int, *,
                     batch_size: int = RASTER_DECODE_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Undo :func:`encode_in_raster`: ``n`` top and bottom grids, int64."""
    return _decoded_per_slice(words, n, lambda decode: _raster(
        prior, n, batch_size, lambda level, probs, i, position: decode(i, probs)))


# ---------------------------------------------------------------------------------------
# Where the bits go
# ---------------------------------------------------------------------------------------

TOP_STRIDE, BOTTOM_STRIDE = 8, 4  # pixels per code side at each level (VQ-VAE-2's encoders)


@torch.inference_mode()
def surprise_bits(prior: CodePrior, codes_top: np.ndarray, codes_bottom: np.ndarray, *,
                  batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The bits the prior spends on each code, ``-log2 p(code | the codes before it)``: float32
    ``(N, h, w)`` and ``(N, 2h, 2w)``. One teacher-forced pass (the probabilities the range coder
    is driven by, before it rounds them to integer frequencies): their sum is the prior-coded
    stream's length to within the coder's rounding."""
    if isinstance(prior, PassPrior) and prior.integer is not None:
        return _surprise_of_copy(prior.integer, codes_top, codes_bottom, batch_size or PASS_BATCH)
    if prior.integer is not None:
        return _surprise_of_copy(prior.integer, codes_top, codes_bottom, batch_size or RASTER_ENCODE_BATCH)
    batch_size = batch_size or PRIOR_BATCH
    prior.eval()
    device = next(prior.parameters()).device
    tops, bottoms = [], []
    for lo in range(0, len(codes_top), batch_size):
        top = torch.as_tensor(np.asarray(codes_top[lo:lo + batch_size]), dtype=torch.long, device=device)
        bottom = torch.as_tensor(np.asarray(codes_bottom[lo:lo + batch_size]), dtype=torch.long, device=device)
        for logits, codes, out in zip(prior(top, bottom), (top, bottom), (tops, bottoms)):
            nats = -torch.log_softmax(logits.float(), dim=1).gather(1, codes[:, None])[:, 0]
            out.append((nats / math.log(2)).cpu().numpy())
    return np.concatenate(tops), np.concatenate(bottoms)


def _surprise_of_copy(prior: IntegerPassPrior | IntegerCodePrior, codes_top: np.ndarray, codes_bottom: np.ndarray,
                      batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`surprise_bits` from an integer copy's weights, along its coder's own path: what the
    coder spends, to within its rounding of them to 24-bit frequencies."""
    truth = {"top": np.asarray(codes_top, dtype=np.int64), "bottom": np.asarray(codes_bottom, dtype=np.int64)}
    bits = {level: np.zeros(codes.shape, dtype=np.float32) for level, codes in truth.items()}
    if isinstance(prior, IntegerPassPrior):
        orders = {level: prior.order(level).cpu().numpy() for level in truth}

        def where(level, step, count):
            return orders[level] == step
    else:  # raster order: the ``count`` positions from ``step``
        def where(level, step, count):
            return np.unravel_index(np.arange(step, step + count), truth[level].shape[1:])

    def code(level, probs, i, step):
        here = where(level, step, len(probs))
        symbols = truth[level][i][here]
        bits[level][i][here] = -np.log2(probs[np.arange(len(symbols)), symbols] / probs.sum(axis=1))
        return symbols

    if isinstance(prior, IntegerPassPrior):
        _passes(prior, len(codes_top), batch_size, code)
    else:
        known = {level: codes.reshape(len(codes), -1) for level, codes in truth.items()}
        _raster(prior, len(codes_top), batch_size, code, known)
    return bits["top"], bits["bottom"]


def bits_per_pixel_map(bits_top: np.ndarray, bits_bottom: np.ndarray) -> np.ndarray:
    """Per-code bits ``(N, h, w)`` and ``(N, 2h, 2w)`` spread evenly over the pixels each code
    covers (8 x 8 at the top, 4 x 4 at the bottom) and added: ``(N, 8h, 8w)`` float32 bits per
    pixel, whose mean over a slice is what its codes cost per pixel."""
    def spread(bits, stride):
        return np.repeat(np.repeat(np.asarray(bits, dtype=np.float32), stride, axis=1), stride, axis=2) / stride**2
    return spread(bits_top, TOP_STRIDE) + spread(bits_bottom, BOTTOM_STRIDE)
