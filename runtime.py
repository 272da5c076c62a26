"""The plumbing every script shares, so that none of them imports another's: checked CLI values and defaults,
the device and dtype, the process group, files written atomically (images included), folder locks, prompt files,
and peak memory.

Nothing here knows about models. Each script's `__main__` runs through `run_cli`, which turns the errors a
user can cause (a bad flag, a missing or broken file, a folder in use) into one `error:` line and exit status 2.
"""

import argparse
import fcntl
import gc
import json
import math
import os
import resource
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from PIL import Image
from PIL.PngImagePlugin import PngInfo

CORPUS_METADATA = "metadata.jsonl"  # a corpus folder's rows: written by synth.py, read by train.py
LOCK_FILE = ".lock"
EXIT_USER_ERROR = 2  # as argparse exits for a bad flag
EXIT_SIGNAL_BASE = 128  # a run stopped by signal N (after saving) exits 128 + N, the shell's convention


# ----------------------------------------------------------------------------------------------------
# CLI values: argparse types that refuse what is not a value, instead of reading 0 or nan as "unset"


def _number(kind, text: str, test, expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value) or not test(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    return _number(float, text, lambda v: v >= 0, "a finite number >= 0")


def unit_interval(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def fill_unset(args: argparse.Namespace, defaults: dict) -> None:
    """Flags left unset (None) take their default (hub.recipe_defaults); a given value, 0 included, stays."""
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def check_size(height: int, width: int, multiple: int, what: str) -> None:
    for name, value in (("--h", height), ("--w", width)):
        if value <= 0 or value % multiple:
            raise ValueError(f"{name} {value} is not a positive multiple of {multiple} ({what})")


# ----------------------------------------------------------------------------------------------------
# Device, dtype and process group

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)


def pick_device_dtype(device: str = "auto", dtype: str = "auto", bf16_on_cpu: bool = False
                      ) -> tuple[torch.device, torch.dtype]:
    """--device auto: CUDA device LOCAL_RANK when there is CUDA (torchrun sets it), else the CPU. --dtype auto:
    bf16 on CUDA; on CPU fp32, or with `bf16_on_cpu` bf16 where the CPU computes it natively (AMX /
    AVX512-BF16, as oneDNN reports)."""
    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device (use cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
    if dtype == "auto":
        native_bf16 = dev.type == "cuda" or (bf16_on_cpu and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return dev, torch.bfloat16 if native_bf16 else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPE_CHOICES)}")
    return dev, DTYPES[dtype]


def peak_memory(device: torch.device) -> int:
    """Measured peak bytes: CUDA's allocator peak, or the process's maximum resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@contextmanager
def process_group(backend: str, **init):
    """torch.distributed's default group for the block, ended when the block ends. Run the block's work in a
    function, so that the models it sharded are gone by then.

    destroy_process_group alone does not end a group that FSDP used: the device mesh FSDP shards over holds the
    group, and DTensor's caches (sharding rules, redistribution plans) hold the mesh. The group and its threads then
    live until the interpreter exits, and tearing them down there aborts the process now and then ("terminate called
    without an active exception", exit -6 after finished work: 5 runs in 20 of a two-rank FSDP step with gloo, torch
    2.13). So every mesh still alive forgets its groups, and the group ends here, in order."""
    dist.init_process_group(backend, **init)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for mesh in [o for o in gc.get_objects() if isinstance(o, DeviceMesh)]:
            # the mesh's name -> group map (torch 2.13), the one reference that is not a cache; meshes of older
            # releases keep only names
            getattr(mesh, "_pg_registry", {}).clear()
        gc.collect()  # the group's last references sit in reference cycles (measured)


# ----------------------------------------------------------------------------------------------------
# Files: atomic writes, folders that take files, and one run per folder


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary name beside `path` (unique to this process), then rename it over `path`: readers see
    the old file or the new one, whole, never a part; a kill leaves only a hidden temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> 8-bit RGB, rounded as diffusers' image processor does."""
    return Image.fromarray((image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


def save_png(image: torch.Tensor, path: Path, settings: dict) -> None:
    """An image (3, H, W) in [0, 1] as an 8-bit PNG written atomically, with the settings that made it as PNG text
    metadata ("l2p" key, JSON)."""
    info = PngInfo()
    info.add_text("l2p", json.dumps(settings))
    with atomic_path(path) as tmp:
        to_pil(image).save(tmp, format="PNG", pnginfo=info)


def writable_folder(folder: Path, flag: str = "--out") -> Path:
    """Create the folder and prove it takes files, before any heavy work."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {folder}: cannot write there ({e.strerror})") from None
    return folder


@contextmanager
def folder_lock(folder: Path, flag: str = "--out"):
    """Hold an exclusive lock on `folder` while a job writes into it, so a second job on the same folder stops
    with an error instead of interleaving with the first. The lock is the kernel's (flock), so a killed job
    releases it and the next one takes the folder over without any stale-lock file to clean."""
    path = folder / LOCK_FILE
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"{flag} {folder}: in use by {holder}; wait for it to finish or use another {flag}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} ({' '.join(sys.argv[:1])})")
    handle.flush()
    try:
        yield
    finally:
        handle.close()


# ----------------------------------------------------------------------------------------------------
# Prompt files


def read_lines(path: Path, flag: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 text file; an undecodable line is named."""
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    lines = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{flag} {path}:{n}: not UTF-8 text") from None
        if text:
            lines.append((n, text))
    return lines


def read_prompt_file(path: Path, flag: str = "--prompts") -> list[dict]:
    """Rows {"prompt", "category"} of a prompt file: plain text, one prompt per line, or JSONL objects with a
    string "prompt" and an optional "category" (a string or null). Blank lines are skipped."""
    lines = read_lines(path, flag)
    if not lines:
        raise ValueError(f"{flag} {path}: holds no prompt")
    if path.suffix != ".jsonl":
        return [{"prompt": text, "category": None} for _, text in lines]
    rows = []
    for n, text in lines:
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag} {path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{flag} {path}:{n}: expected a JSON object with a string \"prompt\"")
        if not isinstance(row.get("category"), (str, type(None))):
            raise ValueError(f"{flag} {path}:{n}: \"category\" must be a string")
        rows.append({"prompt": row["prompt"], "category": row.get("category")})
    return rows


# ----------------------------------------------------------------------------------------------------
# Running a script


def run_cli(main, argv=None):
    """Run a script's main function; the errors a user can cause become one `error:` line and exit status 2
    (hub.CheckpointError is a ValueError). Anything else is a bug and keeps its traceback."""
    try:
        return main(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
