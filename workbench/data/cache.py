"""The on-disk data cache: versioned, content-addressed directories written atomically.

A built dataset lives in ``<cache root>/<name>-v<CACHE_VERSION>-<hash of its build parameters>/``
with tensors in ``*.safetensors`` (uint8 pixels, int16 waveforms) and everything else in JSON; no
pickles. Changing a parameter (seed, scale, FSDD folder contents...) changes the hash, so a stale
cache is never read; bump :data:`CACHE_VERSION` when the build code changes what it writes.

Atomicity: a build writes into a hidden temporary sibling directory and renames it into place in
one ``os.rename``. A build killed half-way leaves only the temporary directory (removed by the next
build once its process is gone), never a half-written cache that would be loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from workbench.data.audio import one_thread

CACHE_VERSION = 4
META = "meta.json"


def params_hash(params: dict[str, Any]) -> str:
    """A short stable hash of JSON-able build parameters."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def entry_dir(root: Path, name: str, params: dict[str, Any]) -> Path:
    return Path(root) / f"{name}-v{CACHE_VERSION}-{params_hash(params)}"


def is_built(path: Path) -> bool:
    return (path / META).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(root: Path) -> None:
    """Delete temporary build directories whose process has died (a killed build)."""
    for tmp in root.glob(".tmp-*"):
        try:
            pid = int(tmp.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def ensure(root: Path, name: str, params: dict[str, Any], build: Callable[[Path], dict[str, Any]],
           force: bool = False) -> Path:  # fmt: skip
    """The cache directory for ``(name, params)``, built first if missing (or if ``force``).

    ``build(tmp_dir)`` writes the data files into ``tmp_dir`` and returns extra metadata; this
    function adds ``meta.json`` (parameters + metadata) and moves the directory into place. The
    build runs torch on one thread (see :func:`~workbench.data.audio.one_thread`).
    """
    root = Path(root)
    target = entry_dir(root, name, params)
    if is_built(target) and not force:
        return target
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"
    tmp.mkdir()
    try:
        with one_thread():
            extra = build(tmp)
        meta = {"name": name, "cache_version": CACHE_VERSION, "params": params, **extra}
        write_json(tmp / META, meta)
        if target.exists():  # force, or a broken leftover: move it aside first, delete after
            old = root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-old"
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_built(target):  # another process won the race with a complete build: use it
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_json(path: Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save with safetensors; a tensor stored twice under two names (e.g. y is digit) is copied once."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    save_file(out, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def files_fingerprint(files: list[Path]) -> str:
    """A hash of the paths, sizes and modification times of ``files``: part of a user folder's cache key."""
    h = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
