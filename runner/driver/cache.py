"""runner's cache directory: checkpoint hashes remembered across runs, and torch.compile's caches.

Everything lives under `$RUNNER_CACHE_DIR`, else `$XDG_CACHE_HOME/runner`, else `~/.cache/runner`:
- `checkpoint-sha256.json`: the SHA-256 of each checkpoint file hashed, keyed by its resolved path and
  valid while its size and modification time are unchanged (hashing a 2.6-GB 650M checkpoint takes
  seconds at every start otherwise). A stale or unreadable cache is simply recomputed.
- `torch-compile/`: TorchInductor's cache (compiled kernels, FX graphs, AOT autograd graphs), so that a
  second run of the same model loads its compiled layers instead of compiling them again.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from runner.models.checkpoints import sha256_file

log = logging.getLogger("runner")

HASH_CACHE_NAME = "checkpoint-sha256.json"
COMPILE_CACHE_NAME = "torch-compile"


def cache_dir() -> Path:
    """runner's cache directory on this machine (not created here)."""
    if os.environ.get("RUNNER_CACHE_DIR"):
        return Path(os.environ["RUNNER_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "runner"


def compile_cache_dir() -> Path:
    """Where TorchInductor keeps its caches for runner's actors on this machine."""
    return cache_dir() / COMPILE_CACHE_NAME


def torch_default_compile_dir() -> str:
    """TorchInductor's own default cache dir, `<tmp>/torchinductor_<user>` (as torch's
    `cache_dir_utils.default_cache_dir`, computed here because importing that module imports torch._inductor)."""
    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    return os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))


def chosen_compile_cache_dir() -> str | None:
    """TORCHINDUCTOR_CACHE_DIR as the user set it in this (the driver's) environment, else None.

    Importing torch._inductor sets TORCHINDUCTOR_CACHE_DIR to torch's default in the importing process, so a
    value equal to that default is not taken for a choice (choosing torch's default on purpose gives the same
    directory the actors would use without runner's cache anyway)."""
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not value or os.path.abspath(value) == os.path.abspath(torch_default_compile_dir()):
        return None
    return value


def use_compile_cache(chosen: str | None = None) -> Path | None:
    """Point this process's TorchInductor caches at `chosen` (the user's TORCHINDUCTOR_CACHE_DIR, read on the
    driver by `chosen_compile_cache_dir`) or else `compile_cache_dir()`, with the FX-graph and AOT-autograd
    caches on; call before anything compiles. Returns the directory used, or None when it cannot be created
    (torch then keeps its default, a temporary dir).

    This process's own TORCHINDUCTOR_CACHE_DIR is used only when it is not torch's default: whatever imported
    torch._inductor in this worker before (it sets the variable to its default on import) must not decide. An
    embedding actor on an H200 reported /tmp/torchinductor_root that way while the shadow actors used runner's
    directory."""
    here = chosen_compile_cache_dir()  # e.g. a cluster whose workers' environment sets it
    directory = Path(chosen or here or compile_cache_dir())
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compile cache %s unusable (%s): compiling without it", directory, e.strerror or e)
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)  # torch reads it at each use: cache_dir_utils.cache_dir
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return directory


def cached_sha256(path: str | Path, cache: Path | None = None) -> tuple[str, bool]:
    """(SHA-256 of the file, whether it came from the cache). The cache entry of a path is used only while
    the file's size and mtime (in ns) are those it was hashed with."""
    p = Path(path).resolve()
    stat = p.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache_file = cache or cache_dir() / HASH_CACHE_NAME
    entries = _read(cache_file)
    entry = entries.get(str(p))
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in key.items()) and entry.get("sha256"):
        log.debug("checkpoint %s: SHA-256 remembered from %s (size and mtime unchanged)", p, cache_file)
        return str(entry["sha256"]), True
    started = time.perf_counter()
    digest = sha256_file(p)
    log.debug("checkpoint %s: hashed %.1f GB in %.1f s (remembered in %s)", p, stat.st_size / 1e9,
             time.perf_counter() - started, cache_file)
    entries = _read(cache_file)  # another job may have added entries while this one hashed
    entries[str(p)] = {**key, "sha256": digest}
    _write(cache_file, entries)
    return digest, False


def _read(cache_file: Path) -> dict:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(cache_file: Path, entries: dict) -> None:
    """Atomically (temp file + rename): concurrent jobs never see half a file. A cache that cannot be
    written costs the next run a hash, nothing else."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.name}.")
        with os.fdopen(fd, "w") as fh:
            json.dump(entries, fh, indent=1, sort_keys=True)
        os.replace(tmp, cache_file)
    except OSError as e:
        log.debug("checkpoint hash cache %s not written: %s", cache_file, e)
