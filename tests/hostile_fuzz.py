"""The fuzz run of ``test_hostile_files.test_fuzzed_files``: a script, run in a process of its own.

A seeded generator spoils valid small files (a frequency-coded and a prior-coded codes file, a
VQ-VAE and a prior checkpoint, one image of a real-header DICOM series) and runs ``mrivq decode``
(to NIfTI or DICOM), ``mrivq sample`` or ``mrivq encode`` on each in this process. Every case must end in exit 0, or in exit 2 with one line on stderr and no traceback;
nothing outside the case's ``--out`` may appear or change, and a failed case writes nothing.
Writes ``{"cases", "exit_0", "exit_2", "failures", "peak_mib", "kinds"}`` to ``--summary``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import random
import resource
import shutil
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from dicom_helpers import spoil_dicom, write_series
from hostile_helpers import join_sections, read_header, split_sections, with_header, with_section

# ---------------------------------------------------------------------------------------
# Random values and edits
# ---------------------------------------------------------------------------------------


def random_value(rng: random.Random, depth: int = 0):
    """A JSON-able value of a random type and size."""
    kind = rng.choice(["int", "huge", "negative", "zero", "float", "nan", "string", "long string", "empty",
                       "list", "dict", "null", "bool", "nested"])
    if kind == "nested" and depth < 2:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {"int": rng.randint(1, 300), "huge": rng.choice([2**31, 2**40, 10**18, 65535]),
            "negative": -rng.randint(1, 10**6), "zero": 0, "float": rng.uniform(-1e6, 1e6),
            "nan": float("nan"), "string": rng.choice(["x", "cpu", "../x.nii.gz", "a\x00.nii.gz", "0" * 16]),
            "long string": "y" * rng.randint(256, 5000), "empty": rng.choice(["", [], {}]),
            "list": [rng.randint(-5, 70000) for _ in range(rng.randint(0, 4))],
            "dict": {"k": rng.randint(0, 9)}, "null": None, "bool": rng.random() < 0.5}.get(kind, 1)


def edit_tree(rng: random.Random, tree, *, keep_type: float = 0.0):
    """Change, delete or add one entry somewhere in a nested dict/list ``tree`` (in place)."""
    node = tree
    for _ in range(rng.randint(0, 3)):
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        children = [(k, v) for k, v in children if isinstance(v, (dict, list)) and v]
        if not children:
            break
        node = rng.choice(children)[1]
    keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
    if not keys:
        return
    key = rng.choice(keys)
    action = rng.random()
    if action < 0.2 and isinstance(node, dict):
        del node[key]
    elif action < 0.3 and isinstance(node, dict):
        node[f"extra{rng.randint(0, 9)}"] = random_value(rng)
    elif isinstance(node[key], (int, float)) and not isinstance(node[key], bool) and rng.random() < keep_type + 0.3:
        node[key] = rng.choice([0, -1, 1, 2**16, 2**31, 10**9, node[key] * rng.choice([2, 8, 1000])])
    else:
        node[key] = random_value(rng)


def mutate_bytes(rng: random.Random, blob: bytes) -> bytes:
    choice = rng.random()
    if choice < 0.35:
        return blob[:rng.randrange(len(blob))]
    data = bytearray(blob)
    if choice < 0.8:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    at = rng.randrange(len(data))
    return bytes(data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + data[at:])


def bomb(size: int, prefix: bytes = b"") -> bytes:
    deflate = zlib.compressobj(9)
    chunk = b" " * (1 << 20)
    return deflate.compress(prefix) + b"".join(deflate.compress(chunk) for _ in range(size >> 20)) + deflate.flush()


# ---------------------------------------------------------------------------------------
# Spoiled codes files
# ---------------------------------------------------------------------------------------


def spoil_codes(rng: random.Random, blob: bytes) -> tuple[str, bytes]:
    sections = split_sections(blob)
    kind = rng.choices(["bytes", "header", "header json", "section", "bomb", "side", "tables", "stream"],
                       weights=[20, 35, 6, 8, 3, 10, 8, 10])[0]
    if kind == "bytes":
        return kind, mutate_bytes(rng, blob)
    if kind == "header":
        header = read_header(blob)
        for _ in range(rng.randint(1, 3)):
            edit_tree(rng, header, keep_type=0.5)
        return kind, with_header(blob, json.dumps(header))
    if kind == "header json":
        text = json.dumps(read_header(blob))
        cut = rng.randrange(len(text))
        return kind, with_header(blob, rng.choice([text[:cut], "[" * rng.randint(1000, 300000), "1e999", "NaN",
                                                   text[:cut] + "\x00" + text[cut:], '"\\ud800"']))
    if kind == "section":
        name, payload = rng.choice(sections)
        edits = [("drop", [(n, p) for n, p in sections if n != name]), ("repeat", [*sections, (name, payload)]),
                 ("unknown", [*sections, ("x" * rng.randint(1, 255), b"abc")]),
                 ("shuffle", rng.sample(sections, len(sections)))]
        return kind, join_sections(blob, rng.choice(edits)[1])
    if kind == "bomb":
        name = rng.choice(["header", "side", "tables"])
        return kind, with_section(blob, name, bomb(rng.choice([32, 64]) << 20, b'{"n": 1, "pad": "'))
    if kind in ("side", "tables") and kind in dict(sections):
        raw = bytearray(zlib.decompress(dict(sections)[kind]))
        if rng.random() < 0.3:
            raw = raw[:rng.randrange(len(raw) + 1)] if rng.random() < 0.5 else raw + bytes(rng.randint(1, 99))
        else:
            for _ in range(rng.randint(1, 6)):
                at = rng.randrange(max(1, len(raw) - 4))
                raw[at:at + 4] = rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\xc0\x7f", b"\x00\x00\x00\x00",
                                             rng.randbytes(4)])
        return kind, with_section(blob, kind, zlib.compress(bytes(raw)))
    stream = dict(sections)["stream"]
    new = rng.choice([b"", stream[:rng.randrange(len(stream) + 1) // 4 * 4], stream + rng.randbytes(4 * rng.randint(1, 99)),
                      rng.randbytes(len(stream)), stream[:-1]])
    return "stream", with_section(blob, "stream", new)


# ---------------------------------------------------------------------------------------
# Spoiled checkpoints
# ---------------------------------------------------------------------------------------


def spoil_checkpoint(rng: random.Random, ckpt: dict, blob: bytes, torch) -> tuple[str, bytes]:
    kind = rng.choices(["bytes", "config", "structure", "tensor"], weights=[25, 40, 20, 15])[0]
    if kind == "bytes":
        return kind, mutate_bytes(rng, blob)
    ckpt = copy.deepcopy(ckpt)
    if kind == "config":
        target = ckpt.get("config", ckpt)
        if "vqvae" in ckpt and rng.random() < 0.4:
            target = ckpt["vqvae"]["config"]
        section = rng.choice([s for s in ("model", "data", "prior", "output", "train") if s in target])
        for _ in range(rng.randint(1, 2)):
            edit_tree(rng, target[section], keep_type=0.7)
    elif kind == "structure":
        plain = {k: v for k, v in ckpt.items() if not isinstance(v, torch.Tensor)}
        key = rng.choice(list(plain))
        action = rng.random()
        if action < 0.4:
            del ckpt[key]
        elif action < 0.7:
            ckpt[key] = rng.choice([torch.zeros(3), "text", 7, None, [1, 2], {}])
        else:
            edit_tree(rng, ckpt, keep_type=0.3)
    else:
        states = [ckpt[k] for k in ("model", "prior") if isinstance(ckpt.get(k), dict)]
        if "vqvae" in ckpt:
            states.append(ckpt["vqvae"]["model"])
        state = rng.choice(states)
        name = rng.choice(sorted(state))
        shape = list(state[name].shape) or [1]
        shape[rng.randrange(len(shape))] = rng.choice([0, 1, 3, 4096])
        state[name] = rng.choice([torch.zeros(shape), torch.zeros(2, dtype=torch.int64), torch.tensor(float("nan"))])
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return kind, buf.getvalue()


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def run_case(cli_main, args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli_main(args)
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 -- what cli.main let through is the finding
            import traceback

            traceback.print_exc(file=err)
            status = 1
    return status, err.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=520)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    for name in ("vqvae", "prior", "codes", "prior_codes", "slices"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from mrivq.cli import main as cli_main

    rng = random.Random(args.seed)
    bases = {name: getattr(args, name) for name in ("vqvae", "prior", "codes", "prior_codes")}
    before = {name: digest(path) for name, path in bases.items()}
    blobs = {name: path.read_bytes() for name, path in bases.items()}
    ckpts = {name: torch.load(bases[name], weights_only=True) for name in ("vqvae", "prior")}
    work = args.work / "fuzz"
    work.mkdir()
    results = {"cases": 0, "exit_0": 0, "exit_2": 0, "failures": [], "kinds": {}}
    for case in range(args.cases):
        folder = work / f"case_{case:04d}"
        folder.mkdir()
        out = folder / "out"
        target = rng.choices(["codes", "prior_codes", "vqvae", "prior", "prior for sample", "dicom"],
                             weights=[40, 13, 17, 13, 5, 12])[0]
        vqvae, prior, codes = bases["vqvae"], bases["prior"], bases["codes"]
        if target == "dicom":  # encode a series with one image spoiled
            series = write_series(folder / "series", 3)
            kind = spoil_dicom(rng, rng.choice(series))
            out = folder / "out.mrvq"
            command = ["encode", "--checkpoint", str(vqvae), str(folder / "series"), "--out", str(out)]
        elif target in ("codes", "prior_codes"):
            kind, data = spoil_codes(rng, blobs[target])
            codes = folder / "spoiled.mrvq"
            codes.write_bytes(data)
            if target == "prior_codes":
                command = ["decode", "--checkpoint", str(vqvae), str(codes), "--out", str(out), "--prior", str(prior)]
            else:
                command = ["decode", "--checkpoint", str(vqvae), str(codes), "--out", str(out)]
            if rng.random() < 0.25:
                command += ["--format", "dicom"]
        else:
            name = "vqvae" if target == "vqvae" else "prior"
            kind, data = spoil_checkpoint(rng, ckpts[name], blobs[name], torch)
            spoiled = folder / "spoiled.pt"
            spoiled.write_bytes(data)
            if target == "vqvae":
                command = ["decode", "--checkpoint", str(spoiled), str(codes), "--out", str(out)]
            elif target == "prior":
                command = ["decode", "--checkpoint", str(vqvae), str(bases["prior_codes"]), "--out", str(out),
                           "--prior", str(spoiled)]
            else:
                command = ["sample", "--prior", str(spoiled), "--n", "2", "--out", str(out)]
        (folder / "bystander.txt").write_text("a user's file")
        inputs = files_under(folder)
        status, err = run_case(cli_main, command)
        lines = err.strip().splitlines()
        problems = []
        if status not in (0, 2):
            problems.append(f"exit {status}")
        if status == 2 and not (len(lines) == 1 and lines[0].startswith("mrivq: error: ")):
            problems.append(f"{len(lines)} lines on stderr")
        if "Traceback" in err or "out of memory" in err:
            problems.append("traceback or memory error")
        if status == 2 and out.exists():
            problems.append("a refused case wrote into --out")
        now = {k: v for k, v in files_under(folder).items() if not k.startswith("out/") and k != "out.mrvq"}
        if now != inputs:
            problems.append("files outside --out changed")
        if sorted(p.name for p in work.iterdir()) != [f"case_{i:04d}" for i in range(case + 1)]:
            problems.append("a file appeared beside the cases")
        if problems:
            results["failures"].append({"case": case, "target": target, "kind": kind, "status": status,
                                        "problems": problems, "command": command[0], "stderr": err[-1500:]})
        results["cases"] += 1
        results[f"exit_{status}"] = results.get(f"exit_{status}", 0) + 1
        results["kinds"][f"{target}/{kind}"] = results["kinds"].get(f"{target}/{kind}", 0) + 1
        for path in folder.iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if {name: digest(path) for name, path in bases.items()} != before:
        results["failures"].append({"problems": ["a base file changed"]})
    results["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.summary.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
