"""Valid small files to spoil, and the byte-level surgery the hostile-file tests do on them
(not a test module; ``hostile_fuzz.py`` runs with it in a child process too)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from prior_helpers import prior_overrides, train_tiny_vqvae


def build_bases(phantom: Path, work: Path) -> dict[str, Path]:
    """A tiny VQ-VAE and prior, a frequency-coded codes file of the test split and a prior-coded
    one of two slices: ``{"vqvae", "prior", "codes", "prior_codes", "slices"}``."""
    from mrivq.apps.encode import encode
    from mrivq.apps.train_prior import train_prior
    from mrivq.config import load_config

    vqvae = train_tiny_vqvae(phantom, work)
    train_prior(load_config(None, prior_overrides(phantom, work, "prior", steps=2, interval=2)), vqvae)
    prior = work / "prior" / "models" / "prior_best.pt"
    slices = sorted((phantom / "keras_slices_test").glob("*.nii.gz"))
    encode(vqvae, [phantom / "keras_slices_test"], work / "codes.mrvq")
    encode(vqvae, slices[:2], work / "prior_codes.mrvq", prior=prior)
    return {"vqvae": vqvae, "prior": prior, "codes": work / "codes.mrvq", "prior_codes": work / "prior_codes.mrvq",
            "slices": phantom / "keras_slices_test"}


def split_sections(blob: bytes) -> list[tuple[str, bytes]]:
    """The (name, payload) sections of a well-formed codes file, in order."""
    out, at = [], 5
    while at < len(blob):
        size = blob[at]
        name = blob[at + 1:at + 1 + size].decode()
        (length,) = struct.unpack("<I", blob[at + 1 + size:at + 5 + size])
        start = at + 5 + size
        out.append((name, blob[start:start + length]))
        at = start + length
    return out


def join_sections(head: bytes, sections: list[tuple[str, bytes]]) -> bytes:
    return head[:5] + b"".join(struct.pack("<B", len(name)) + name.encode() + struct.pack("<I", len(payload))
                               + payload for name, payload in sections)


def read_header(blob: bytes) -> dict:
    return json.loads(zlib.decompress(dict(split_sections(blob))["header"]))


def with_section(blob: bytes, name: str, payload: bytes) -> bytes:
    """``blob`` with section ``name``'s payload replaced (raw bytes, as stored)."""
    return join_sections(blob, [(n, payload if n == name else p) for n, p in split_sections(blob)])


def with_header(blob: bytes, header) -> bytes:
    """``blob`` with its header replaced by ``header`` (JSON text or any JSON value), zlib-compressed."""
    text = header if isinstance(header, (str, bytes)) else json.dumps(header)
    return with_section(blob, "header", zlib.compress(text.encode() if isinstance(text, str) else text))
