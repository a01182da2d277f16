"""Where and how tensors are computed: device, precision, threads, seeding, RNG states.

One place decides these for training, prediction and benchmarks, so that all three
run the model the same way and log the same choice.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from mrivq.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; "
                          "use --set train.device=auto or cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bfloat16 instructions (AVX-512 BF16 or AMX).

    Without them PyTorch emulates bfloat16 and autocast is several times *slower*
    than float32 (measured: ~7x on an AVX2-only EPYC for a 128-channel conv).
    """
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA with bf16 support or on a CPU with native bf16, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


def resolve_compile(compile: bool | str, device: torch.device) -> bool:
    """``auto``: torch.compile on CUDA only. On a 2-core AVX2 CPU a compiled default run was
    slower than eager (7-9 against 9-10 images/s, with ~20 s of compiling first)."""
    if compile == "auto":
        return device.type == "cuda"
    return bool(compile)


def autocast(device: torch.device, precision: str):
    """Autocast context for the resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)


@contextlib.contextmanager
def torch_threads(num_threads: int):
    """torch's intra-op threads set to ``num_threads`` inside the block, restored after it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def capture_rng() -> dict:
    """The global RNG states (torch CPU and CUDA, NumPy, Python) as a checkpoint-safe dict."""
    _name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss": python_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Set the global RNG states from :func:`capture_rng`'s dict (parts it lacks stay as they are)."""
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
