"""One range-coding driver for every prior: slices coded in the order their prior's integer copy
gives, each slice in its own stream, encoder and decoder as mirror images.

An integer copy (one per prior kind) runs its own order over a batch of slices (``code_batch``:
in passes, in raster order, ...), calling ``code(level, weights, slice, positions)`` for each
group of a slice's positions it has weights for (float64 integers ``(P, K)``, the same on every
machine) and going on with the codes it returns: :func:`encode` codes the known ones,
:func:`decode` decodes them, :func:`surprise_bits` counts what they cost. Each slice has its own
stream, so encoder and decoder choose batches, threads and device freely.

The stream: the ``N`` slices' stream lengths, then the streams one after another (uint32 words).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from mrivq.data.volumes import coding_depths
from mrivq.runtime import torch_threads


def coder():
    """constriction's categorical model class and range coders (imported when coding: the
    compression layer stays light to import)."""
    import constriction

    return constriction.stream.model.Categorical, constriction.stream.queue


def encode(copy, codes_top: np.ndarray, codes_bottom: np.ndarray, *, batch_size: int | None = None,
           references: np.ndarray | None = None) -> np.ndarray:
    """Range-code ``codes_top`` ``(N, h, w)`` and ``codes_bottom`` ``(N, 2h, 2w)`` under ``copy``;
    returns the uint32 words (:func:`decode` gives the codes back on any machine, with any
    ``batch_size``: slices coded together, by default the copy's own; ``references``: the slices
    each one is coded after, as :func:`run` takes them)."""
    categorical, queue = coder()
    model = categorical(perfect=False)
    truth = _flat(codes_top, codes_bottom)
    encoders = [queue.RangeEncoder() for _ in range(len(codes_top))]

    def code(level, weights, i, where):
        symbols = np.ascontiguousarray(truth[level][i, where], dtype=np.int32)
        encoders[i].encode(symbols, model, weights)
        return symbols

    run(copy, len(codes_top), code, truth, batch_size, references)
    streams = [encoder.get_compressed() for encoder in encoders]
    return np.concatenate([np.array([len(s) for s in streams], dtype=np.uint32), *streams])


def decode(copy, words: np.ndarray, n: int, *, batch_size: int | None = None,
           references: np.ndarray | None = None, wanted=None) -> tuple[np.ndarray, np.ndarray]:
    """Undo :func:`encode`: ``n`` top and bottom grids, int64. ``wanted``: decode only these slices
    (indices) and the slices they are coded after; every other slice's codes come back as -1.
    ``ValueError`` for a stream whose lengths do not add up, or that holds more words than its codes."""
    categorical, queue = coder()
    model = categorical(perfect=False)
    streams = split_streams(words, n)
    slices = np.arange(n) if wanted is None else needed(references, wanted, n)
    if references is not None and wanted is not None:  # the references among the slices decoded
        place = np.append(np.full(n, -1, dtype=np.int64), -1)  # place[-1]: still none
        place[slices] = np.arange(len(slices))
        references = place[np.asarray(references, dtype=np.int64)[slices]]
    decoders = [queue.RangeDecoder(np.ascontiguousarray(streams[i])) for i in slices]

    def code(level, weights, i, where):
        return decoders[i].decode(model, weights)

    top, bottom = run(copy, len(slices), code, None, batch_size, references)
    if not all(decoder.maybe_exhausted() for decoder in decoders):
        raise ValueError("a slice's stream holds more words than its codes")
    if wanted is None:
        return top, bottom
    out = [np.full((n, *grids.shape[1:]), -1, dtype=grids.dtype) for grids in (top, bottom)]
    out[0][slices], out[1][slices] = top, bottom
    return out[0], out[1]


def needed(references: np.ndarray | None, wanted, n: int) -> np.ndarray:
    """The sorted indices of the slices ``wanted`` and of every slice they are coded after, at
    any remove (``references``: as :func:`run` takes them; None: the slices stand alone)."""
    keep = np.zeros(n, dtype=bool)
    todo = [int(i) for i in np.asarray(wanted, dtype=np.int64).reshape(-1)]
    while todo:
        i = todo.pop()
        if i >= 0 and not keep[i]:
            keep[i] = True
            todo += [] if references is None else [int(r) for r in references[i]]
    return np.flatnonzero(keep)


def surprise_bits(copy, codes_top: np.ndarray, codes_bottom: np.ndarray,
                  references: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The bits ``copy`` spends on each code, ``-log2 p(code | the codes coded before it)``: float32
    ``(N, h, w)`` and ``(N, 2h, 2w)``, along the encoder's own path (their sum is the stream's
    length to within the coder's rounding of the weights to 24-bit frequencies)."""
    truth = _flat(codes_top, codes_bottom)
    bits = {level: np.zeros(codes.shape, dtype=np.float32) for level, codes in truth.items()}

    def code(level, weights, i, where):
        symbols = truth[level][i, where]
        bits[level][i, where] = -np.log2(weights[np.arange(len(symbols)), symbols] / weights.sum(axis=1))
        return symbols

    run(copy, len(codes_top), code, truth, references=references)
    return bits["top"].reshape(np.shape(codes_top)), bits["bottom"].reshape(np.shape(codes_bottom))


def _flat(codes_top: np.ndarray, codes_bottom: np.ndarray) -> dict[str, np.ndarray]:
    return {level: np.asarray(codes, dtype=np.int64).reshape(len(codes), -1)
            for level, codes in (("top", codes_top), ("bottom", codes_bottom))}


def run(copy, n: int, code, known: dict[str, np.ndarray] | None, batch_size: int | None = None,
        references: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``copy.code_batch`` over the batches of ``n`` slices, concatenated (``known``: the codes, when
    encoding). On the CPU, batches run side by side, one per thread, each op on one thread, at most
    ``copy.in_flight`` slices at once (within the memory a prior checkpoint is checked for): small
    batches keep the integer working set in the caches. A progress bar counts the slices (on a
    terminal: a transformer prior takes minutes for a few hundred).

    ``references`` (int ``(N, 2)``, an order :func:`mrivq.data.volumes.coding_depths` accepts): the
    slices each slice is coded after, -1 for none; their codes go to ``code_batch`` as
    ``references`` (``(codes_top (B, 2, h w), codes_bottom (B, 2, 4 h w))`` of the batch's slices,
    flat, -1 where there is none). The encoder knows them all and codes every slice at once; the
    decoder decodes the slices in waves, each slice once the slices it references are decoded."""
    side = "decode" if known is None else "encode"
    batch_size = batch_size or copy.batch[side]
    waves = [np.arange(n)]  # the encoder's one wave: it knows every code
    if references is not None:
        references = np.asarray(references, dtype=np.int64)
        depth = coding_depths(references)
        if depth is None:
            raise ValueError("the references are not an order a decoder can follow")
        if known is None:
            waves = [np.flatnonzero(depth == d) for d in range(depth.max() + 1)]
    order = np.concatenate(waves)  # position p of the walk codes slice order[p] (the encoder's: p)
    bar = tqdm(total=n, desc="prior coder", unit="slice", disable=None, leave=False)
    out = []

    def counted(lo: int, size: int):
        extra = {} if references is None else {
            "references": _referenced_codes(out, known, references[order[lo:lo + size]])}
        part = copy.code_batch(lo, size, lambda level, w, p, where: code(level, w, order[p], where), known, **extra)
        bar.update(size)
        return part

    try:
        done = 0
        for wave in waves:
            workers = 1
            if copy.device.type == "cpu":
                workers = max(1, min(torch.get_num_threads(), copy.in_flight[side] // batch_size))
            # batches of at most batch_size, as many for each worker (a wave of 18 on 2 threads: 6 of 3)
            size = -(-len(wave) // (workers * -(-len(wave) // (workers * batch_size))))
            jobs = [(lo, min(size, done + len(wave) - lo)) for lo in range(done, done + len(wave), size)]
            workers = min(workers, len(jobs))
            if workers > 1:
                with torch_threads(1), ThreadPoolExecutor(workers) as pool:
                    try:
                        parts = list(pool.map(lambda job: counted(*job), jobs))
                    finally:  # on an error or Ctrl-C, the batches not yet started are dropped
                        pool.shutdown(wait=True, cancel_futures=True)
            else:
                parts = [counted(*job) for job in jobs]
            _place(out, parts, order[done:done + len(wave)], n)
            done += len(wave)
    finally:
        bar.close()
    return out[0], out[1]


def _place(out: list, parts: list, slices: np.ndarray, n: int) -> None:
    """Put the codes of ``parts`` (batches of ``slices``, in turn) in their slices' places of
    ``out`` (``[top, bottom]``, made at the first parts)."""
    for level in range(2):
        codes = np.concatenate([part[level] for part in parts])
        if len(out) <= level:
            out.append(np.zeros((n, *codes.shape[1:]), dtype=codes.dtype))
        out[level][slices] = codes


def _referenced_codes(out: list, known: dict | None, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The flat codes ``(B, 2, h * w)`` and ``(B, 2, 4 h w)`` of the slices ``refs`` ``(B, 2)`` (-1
    where there is none, and there the codes are -1) from the known codes or those decoded so
    far; None when no slice of the batch has one."""
    if (refs < 0).all():
        return None
    grids = []
    for level, name in enumerate(("top", "bottom")):
        source = known[name] if known is not None else out[level].reshape(len(out[level]), -1)
        codes = source[np.maximum(refs, 0)].copy()
        codes[refs < 0] = -1
        grids.append(codes)
    return grids[0], grids[1]


def split_streams(words: np.ndarray, n: int) -> list[np.ndarray]:
    """The ``n`` per-slice streams of :func:`encode`'s words; ``ValueError`` when the lengths do
    not add up to the words that follow them."""
    words = np.asarray(words, dtype=np.uint32)
    if words.size < n:
        raise ValueError("fewer words than slices")
    lengths = words[:n].astype(np.int64)
    if int(lengths.sum()) != words.size - n:
        raise ValueError("the per-slice stream lengths do not add up to the stream")
    ends = n + np.cumsum(lengths)
    return [words[end - length:end] for end, length in zip(ends, lengths)]
