"""Slices as volumes: which slice comes before which in its scan.

HipMRI names each slice after its volume and its place in it, ``case_NNN_week_W_slice_S``
(and so does the phantom); consecutive ``S`` of one ``case_NNN_week_W`` are neighbouring
slices. A prior that codes a slice given the one before it (:mod:`mrivq.compression.priors`,
``prior.kind: volume``) learns from and codes along these chains; every other name is a slice
on its own.

Example::

    >>> names = ["case_004_week_0_slice_1.nii.gz", "case_004_week_0_slice_0.nii.gz", "other.nii.gz",
    ...          "case_004_week_0_slice_2.nii.gz", "case_004_week_0_slice_3.nii.gz"]
    >>> predecessors(names).tolist()
    [1, -1, -1, 0, 3]
    >>> predecessors(names, key_every=2).tolist()
    [1, -1, -1, -1, 3]
    >>> [run.tolist() for run in volume_runs(names)]
    [[1, 0, 3, 4], [2]]
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

_HIPMRI_NAME = re.compile(r"^(?P<volume>.+)_slice_(?P<index>\d{1,6})(\.nii(\.gz)?)?$", re.IGNORECASE)


def volume_place(name: str) -> tuple[str, int] | None:
    """``(volume, slice index)`` of a HipMRI-style slice name (a path's file name), else None."""
    match = _HIPMRI_NAME.match(Path(name).name)
    return (match["volume"].lower(), int(match["index"])) if match else None


def predecessors(names: list[str], key_every: int | None = None) -> np.ndarray:
    """int64 ``(N,)``: for each slice the index (in ``names``) of the slice just before it in its
    volume (slice ``S - 1`` of the same volume, wherever it is in the list), or -1 where it has
    none. ``key_every``: a chain starts afresh (a key slice, -1) every ``key_every`` slices of a
    run of consecutive slices, so a slice never waits on more than ``key_every - 1`` others."""
    where = {}
    runs = defaultdict(list)
    for i, name in enumerate(names):
        place = volume_place(name)
        if place is not None and place not in where:
            where[place] = i
            runs[place[0]].append(place[1])
    previous = np.full(len(names), -1, dtype=np.int64)
    for volume, indices in runs.items():
        length = 0  # of the chain so far
        for index in sorted(indices):
            before = where.get((volume, index - 1))
            length = length + 1 if before is not None else 0
            if key_every is not None and length % key_every == 0:
                length = 0
            if length:
                previous[where[(volume, index)]] = before
    return previous


def chain_depths(previous: np.ndarray) -> np.ndarray | None:
    """int64 ``(N,)``: how many slices each one waits on (0 for a slice with no predecessor), or
    None when ``previous`` is not a forest of chains over ``range(N)`` (an index out of range, a
    slice its own ancestor, or two slices with the same predecessor)."""
    previous = np.asarray(previous, dtype=np.int64)
    n = len(previous)
    if previous.ndim != 1 or ((previous < -1) | (previous >= n) | (previous == np.arange(n))).any():
        return None
    linked = previous[previous >= 0]
    if len(np.unique(linked)) != len(linked):
        return None
    after = np.full(n, -1, dtype=np.int64)  # each slice's successor (at most one)
    after[linked] = np.flatnonzero(previous >= 0)
    depth = np.full(n, -1, dtype=np.int64)
    for start in np.flatnonzero(previous < 0):
        i, d = start, 0
        while i >= 0:
            depth[i], i, d = d, after[i], d + 1
    return depth if (depth >= 0).all() else None  # a slice never reached lies on a cycle


def volume_runs(names: list[str]) -> list[np.ndarray]:
    """The slices as runs of consecutive slices of one volume, each run's indices (in ``names``)
    in slice order; a slice with no neighbour in the list is a run of its own. Every index is in
    exactly one run, the runs in the order of their first slice in ``names``."""
    previous = predecessors(names)
    after = np.full(len(names), -1, dtype=np.int64)
    after[previous[previous >= 0]] = np.flatnonzero(previous >= 0)
    runs = []
    for start in np.flatnonzero(previous < 0):
        run = [start]
        while after[run[-1]] >= 0:
            run.append(after[run[-1]])
        runs.append(np.array(run, dtype=np.int64))
    return runs
