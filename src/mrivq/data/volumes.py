"""Slices as volumes: which slices neighbour which in their scan, and the order a volume prior
codes them in.

HipMRI names each slice after its volume and its place in it, ``case_NNN_week_W_slice_S``
(and so does the phantom); consecutive ``S`` of one ``case_NNN_week_W`` are neighbouring
slices. A volume prior (:mod:`mrivq.compression.priors`, ``prior.kind: volume``) codes a run of
consecutive slices as video codecs code frames with B-frames: key slices alone (every
``key_every``-th slice of the run, and its last), then, halving the gaps, each slice between two
coded ones given both (:func:`references`). Every other name is a slice on its own.

Example::

    >>> names = [f"case_004_week_0_slice_{s}.nii.gz" for s in (4, 0, 2, 1, 3)] + ["scan.nii.gz"]
    >>> [run.tolist() for run in volume_runs(names)]
    [[1, 3, 2, 4, 0], [5]]
    >>> references(names, key_every=4).tolist()  # slice 2 between 0 and 4, 1 and 3 next to it
    [[-1, -1], [-1, -1], [1, 0], [1, 2], [2, 0], [-1, -1]]
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

_HIPMRI_NAME = re.compile(r"^(?P<volume>.+)_slice_(?P<index>\d{1,6})(\.nii(\.gz)?)?$", re.IGNORECASE)


def volume_place(name: str) -> tuple[str, int] | None:
    """``(volume, slice index)`` of a HipMRI-style slice name (a path's file name), else None."""
    match = _HIPMRI_NAME.match(Path(name).name)
    return (match["volume"].lower(), int(match["index"])) if match else None


def neighbours(names: list[str], gap: int) -> np.ndarray:
    """int64 ``(N, 2)``: for each slice the indices (in ``names``) of slices ``S - gap`` and
    ``S + gap`` of its volume, wherever they are in the list; -1 where there is none."""
    where = {}
    for i, name in enumerate(names):
        place = volume_place(name)
        if place is not None:
            where.setdefault(place, i)
    out = np.full((len(names), 2), -1, dtype=np.int64)
    for (volume, index), i in where.items():
        out[i] = where.get((volume, index - gap), -1), where.get((volume, index + gap), -1)
    return out


def volume_runs(names: list[str]) -> list[np.ndarray]:
    """The slices as runs of consecutive slices of one volume, each run's indices (in ``names``)
    in slice order; a slice with no neighbour in the list is a run of its own. Every index is in
    exactly one run, the runs in the order of their first slice in ``names``."""
    before, after = neighbours(names, 1).T
    runs = []
    for start in np.flatnonzero(before < 0):
        run = [start]
        while after[run[-1]] >= 0:
            run.append(after[run[-1]])
        runs.append(np.array(run, dtype=np.int64))
    return runs


def references(names: list[str], key_every: int) -> np.ndarray:
    """int64 ``(N, 2)``: the two slices each slice is coded after (-1, -1 for a key slice). In each
    run of consecutive slices, every ``key_every``-th slice and the last are key slices; the slice
    halfway between two coded slices is coded given both, and so on down the halves, so a slice
    waits on at most ``2 log2(key_every)`` others."""
    out = np.full((len(names), 2), -1, dtype=np.int64)
    for run in volume_runs(names):
        keys = sorted(set(range(0, len(run), key_every)) | {len(run) - 1})
        spans = list(itertools.pairwise(keys))
        while spans:
            lo, hi = spans.pop()
            if hi - lo > 1:
                mid = (lo + hi) // 2
                out[run[mid]] = run[lo], run[hi]
                spans += [(lo, mid), (mid, hi)]
    return out


def gap_shares(key_every: int) -> dict[int, float]:
    """``{gap: share}``: of the slices :func:`references` codes in a long run, the share coded
    between slices ``gap`` away on each side (gap 0: key slices)."""
    names = [f"v_slice_{s}" for s in range(64 * key_every + 1)]
    refs = references(names, key_every)
    gaps = np.where(refs[:, 0] < 0, 0, (refs[:, 1] - refs[:, 0]) // 2)
    values, counts = np.unique(gaps, return_counts=True)
    return {int(v): float(c) / len(names) for v, c in zip(values, counts)}


def coding_depths(refs) -> np.ndarray | None:
    """int64 ``(N,)``: how many waves of decoding come before each slice's (0: a slice that
    references none), or None when ``refs`` ``(N, 2)`` is not an order a decoder can follow (an
    index out of range, a slice its own reference or its own ancestor)."""
    refs = np.asarray(refs, dtype=np.int64)
    n = len(refs)
    if refs.ndim != 2 or refs.shape[1] != 2 or ((refs < -1) | (refs >= n)).any() \
            or (refs == np.arange(n)[:, None]).any():
        return None
    children = defaultdict(list)
    waiting = np.zeros(n, dtype=np.int64)
    for i, row in enumerate(refs.tolist()):
        for ref in set(row) - {-1}:
            children[ref].append(i)
            waiting[i] += 1
    depth = np.zeros(n, dtype=np.int64)
    ready = list(np.flatnonzero(waiting == 0))
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for child in children[i]:
            depth[child] = max(depth[child], depth[i] + 1)
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    return depth if done == n else None  # a slice never ready lies on a cycle
