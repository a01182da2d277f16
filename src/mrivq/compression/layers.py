"""Coding layers: what a codes file carries on top of the codes, one registry entry each.

A layer stores, per slice, what turns the picture decoded from the codes into a better one: the
stored values within a bound, or exactly. The codes file keeps each layer's payloads in a
section of its own (``layer-<name>``), its header lists the layers in the order they apply;
:class:`mrivq.compression.codec.Codec` writes them (``compress(slices, layers=[name],
layer_options={name: {...}})``) and applies them on ``decompress``. A layer sees the picture in
float64 scanner intensities: decoded by the decoder's integer copy for new files (the same
numbers on every machine), in float64 for files before it (the same to far below a stored unit;
a layer that rounds it must still guard against ties); a layer that codes volumes also sees the
slices it is coded after. It gives back a :class:`Stored` slice: the numbers the input file
held, written back in its own type. A payload is untrusted: ``decode`` bounds what it allocates
and raises ``ValueError`` on a damaged one.

:func:`code_slices` runs a file's layers on every slice, each slice encoded and its payload
decoded again (what the file will decode to), on :data:`LAYER_PROCESSES` processes once a file
has :data:`PARALLEL_SLICES` slices (on Linux): a layer's work is Python and numpy that holds the
GIL, so threads would not share it. A slice starts as soon as the slices it is coded after are done;
the payloads are the same however many processes.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from mrivq.data.volumes import coding_depths


@dataclass(frozen=True)
class Stored:
    """A slice as its file stores it: ``values`` ``(h, w)`` before ``scl_slope`` / ``scl_inter``
    (int64 for an integer type, float64 for a float type), the on-disk ``dtype`` and the scaling
    that makes them scanner intensities."""

    values: np.ndarray
    dtype: str
    slope: float = 1.0
    inter: float = 0.0

    def scanner(self) -> np.ndarray:
        """Scanner intensities, float64."""
        return self.values * self.slope + self.inter


class Refused(ValueError):
    """A slice a layer cannot code as asked (the message says why, for the user)."""


@dataclass(frozen=True)
class CodingLayer:
    """One layer: ``name`` (its section: ``layer-<name>``), ``label`` (in messages), ``encode(original:
    Stored, picture (h, w) float64, **options) -> bytes`` and ``decode(payload, picture) -> Stored``.
    ``references``: whether it codes a slice of a volume given others (both functions then take
    ``references``, the :class:`Stored` slices it is coded after as this layer decoded them: two
    of its volume, or none for a key slice; the codec picks them and the file lists them). Both
    are module-level functions: a file's slices are coded on worker processes. ``prepare``: what
    builds the layer's tables, called before the workers start, so that forked ones share them."""

    name: str
    label: str
    encode: Callable[..., bytes]
    decode: Callable[..., Stored]
    references: bool = False
    prepare: Callable[[], object] | None = None


#: The layers, by name.
LAYERS: dict[str, CodingLayer] = {}


def register(layer: CodingLayer) -> CodingLayer:
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", layer.name):  # what a codes file's header accepts
        raise ValueError(f"a coding layer's name is 1-32 lowercase letters, digits or _, not {layer.name!r}")
    LAYERS[layer.name] = layer
    return layer


# -- coding a file's slices ------------------------------------------------------------------

#: Processes a file's slices are coded on (one per core this process may use, at most 4) ...
LAYER_PROCESSES = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
#: ... once it has this many slices (below, starting them costs more than it saves).
PARALLEL_SLICES = 16


class SliceRefused(Exception):
    """Slice ``index``, which a layer (its ``label``) cannot code, and why (a :class:`Refused`'s message)."""

    def __init__(self, index: int, label: str, reason: str) -> None:
        super().__init__(index, label, reason)
        self.index, self.label, self.reason = index, label, reason


def code_slices(layers: list[CodingLayer], options: dict[str, dict], originals: list[Stored],
                pictures: list[np.ndarray], refs: np.ndarray | None, *,
                desc: str = "") -> tuple[list[list[bytes]], list[Stored]]:
    """Each slice's payload of each of ``layers`` (``[slice][layer]``, ``options`` by layer name)
    and what the last layer decodes it to; each slice is coded from its ``pictures`` (float64
    scanner intensities) given the slices ``refs`` (``(N, 2)``, -1: none; None: every slice alone)
    has it coded after, as they decode, and starts as soon as those are done. :class:`SliceRefused`
    for a slice a layer cannot code; ``ValueError`` for references no order can follow."""
    n = len(originals)
    if refs is not None and (len(refs) != n or coding_depths(refs) is None):
        raise ValueError("the slices' references are not an order they can be coded in")
    around = [() if refs is None else tuple(int(j) for j in refs[i] if j >= 0) for i in range(n)]
    waiting, after = [len(set(a)) for a in around], defaultdict(list)  # references not yet coded; who waits on each
    for i, a in enumerate(around):
        for j in set(a):
            after[j].append(i)
    ready = deque(i for i in range(n) if not waiting[i])
    payloads: list = [None] * n
    kept: dict[tuple[str, int], Stored] = {}  # each layer's decoded slices, by (layer name, index)
    for layer in layers:
        if layer.prepare is not None:
            layer.prepare()
    with _executor(n) as pool, tqdm(total=n, desc=desc, unit="slice", disable=None, leave=False) as bar:
        running: set = set()
        while ready or running:
            while ready and len(running) < 2 * LAYER_PROCESSES:  # a few queued per worker, the rest here
                i = ready.popleft()
                given = {(layer.name, j): kept[layer.name, j] for layer in layers if layer.references for j in around[i]}
                running.add(pool.submit(_code_slice, layers, options, i, originals[i], pictures[i],
                                        None if refs is None else around[i], given))
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                i, coded, stored = future.result()
                payloads[i] = coded
                kept.update(((layer.name, i), one) for layer, one in zip(layers, stored))
                for k in after.pop(i, ()):
                    waiting[k] -= 1
                    if not waiting[k]:
                        ready.append(k)
                bar.update()
    return payloads, [kept[layers[-1].name, i] for i in range(n)]


def _code_slice(layers: list[CodingLayer], options: dict[str, dict], index: int, original: Stored,
                picture: np.ndarray, refs: tuple[int, ...] | None, given: dict) -> tuple[int, list[bytes], list[Stored]]:
    """Slice ``index`` coded through ``layers`` from its ``original`` and ``picture``, given its
    references ``refs`` (file indices; None: a file whose slices are all coded alone) as ``given``
    has them by (layer name, index): its payloads and what each decodes to. Runs on a worker
    process, or in this one."""
    coded, stored = [], []
    for layer in layers:
        around = {} if refs is None or not layer.references else \
            {"references": tuple(given[layer.name, j] for j in refs)}
        try:
            payload = layer.encode(original, picture, **options.get(layer.name, {}), **around)
        except Refused as e:
            raise SliceRefused(index, layer.label, str(e)) from None
        coded.append(payload)
        stored.append(layer.decode(payload, picture, **around))
        picture = stored[-1].scanner()
    return index, coded, stored


def _one_thread() -> None:
    """A worker's BLAS on one thread: with a process per core, each one's BLAS spinning a thread per
    core made two workers slower than one process."""
    threadpool_limits(1)


class _Here:
    """An executor that runs each job here, as it is submitted (a file too small for processes);
    what a job raises, submit raises."""

    def submit(self, fn, *args) -> Future:
        future = Future()
        future.set_result(fn(*args))
        return future


@contextmanager
def _executor(n: int):
    """:data:`LAYER_PROCESSES` worker processes for a file of :data:`PARALLEL_SLICES` slices or
    more on Linux, else :class:`_Here`."""
    if LAYER_PROCESSES < 2 or n < PARALLEL_SLICES or not sys.platform.startswith("linux"):
        with threadpool_limits(1):  # as fast when idle; BLAS threads spinning beside other work: 9x slower
            yield _Here()
        return
    # Linux only: fork starts the workers in milliseconds, they share the tables the layers built
    # (prepare), and the user's __main__ script never runs again (spawn would start interpreters
    # for each call). They run the layers' numpy and range coding only, never torch, so the
    # parent's threads do not matter.
    pool = ProcessPoolExecutor(LAYER_PROCESSES, mp_context=multiprocessing.get_context("fork"), initializer=_one_thread)
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)
