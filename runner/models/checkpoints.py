"""Safe loading, hashing and download of fair-esm checkpoint files.

Checkpoints are always read with `torch.load(weights_only=True)`: pickle may then only rebuild tensors,
plain containers and the classes allowlisted below, so a tampered file cannot run code. We never fall back
to `weights_only=False`.

The allowlist holds exactly what the released ESM-2 files (`esm2_*.pt` and `*-contact-regression.pt`)
pickle besides tensors and builtins: `argparse.Namespace`, the fairseq model arguments stored as
`cfg["model"]` that fair-esm reads as `cfg["model"].encoder_layers` etc. Projects loading the released
ESM-2 weights with `weights_only=True` allowlist this one class and nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from runner.errors import CheckpointError, first_line

logger = logging.getLogger(__name__)  # a child of "runner": actor-side, see runner.driver.console

# Classes (other than tensors, storages and builtin containers) a fair-esm ESM-2 checkpoint may hold.
FAIR_ESM_SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

FAIR_ESM_MODEL_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"
FAIR_ESM_REGRESSION_URL = "https://dl.fbaipublicfiles.com/fair-esm/regression/{name}-contact-regression.pt"

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def refusal_reason(error: BaseException) -> str:
    """Why torch's safe loader (weights_only=True) refused a file, in a few words, without torch's advice to
    load with weights_only=False (which can run arbitrary code: we never do, and never suggest it)."""
    text = _ANSI.sub("", str(error))
    found = _UNSUPPORTED_GLOBAL.search(text)
    if found:
        return f"it holds Python class {found.group(1)}"
    detail = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    reason = detail.group(1).split(". Please", 1)[0].strip() if detail else ""
    if not reason or "weights_only" in reason or "can still be loaded" in reason:
        return "it holds objects other than tensors and plain containers"
    return reason


def name_list(names: list[str], limit: int = 10) -> str:
    """The first `limit` of `names`, comma-separated, and how many more: the weights a loader's error lists."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def regression_path(checkpoint: Path) -> Path:
    """Where fair-esm looks for a checkpoint's contact-regression weights: `<stem>-contact-regression.pt`."""
    return checkpoint.with_name(f"{checkpoint.stem}-contact-regression.pt")


def load_fair_esm_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a fair-esm `.pt` file safely: a dict holding at least a "model" dict of tensors.

    `mmap=True` maps the tensors instead of reading them (cheap when only the config is needed); files in
    the legacy (non-zip) format are then read normally. Every failure becomes one-line CheckpointError.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"checkpoint {p} not found: check the path, or give a known model name such as esm2_t33_650M_UR50D"
        )
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} is not a file: give the path of a fair-esm .pt file")
    use_mmap = mmap and zipfile.is_zipfile(p)  # mmap needs the zip format of torch >= 1.6
    try:
        with torch.serialization.safe_globals(list(FAIR_ESM_SAFE_GLOBALS)):
            data = torch.load(p, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        found = _UNSUPPORTED_GLOBAL.search(str(e))
        if found:
            raise CheckpointError(
                f"checkpoint {p} holds Python class {found.group(1)}, which is not allowed in a fair-esm "
                f"checkpoint (only tensors and argparse.Namespace are loaded, for safety): use an official "
                f"esm2_*.pt file or re-save the state dict with plain types"
            ) from None
        raise CheckpointError(
            f"{p} is refused by the safe loader ({refusal_reason(e)}; only tensors and argparse.Namespace are "
            f"loaded): use an official esm2_*.pt file or re-save the state dict with plain types"
        ) from None
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zipfile.BadZipFile,
        IndexError,
        KeyError,
        TypeError,
        AttributeError,
    ) as e:  # what torch's loaders raise on truncated or foreign bytes
        raise CheckpointError(
            f"{p} is not a readable torch checkpoint ({first_line(e)}): the file is truncated or of another "
            f"format; re-download it"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"checkpoint {p} holds a {type(data).__name__}, not the dict of a fair-esm checkpoint "
            f"(with 'model' and 'cfg'): give an official esm2_*.pt file"
        )
    if not isinstance(data.get("model"), dict):
        keys = ", ".join(sorted(map(str, data))[:10]) or "none"
        raise CheckpointError(
            f"checkpoint {p} has no 'model' state dict (top-level keys: {keys}): give an official esm2_*.pt file"
        )
    return data


def sha256_file(path: str | Path, chunk_bytes: int = 16 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so memory stays flat for multi-GB checkpoints."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def hub_checkpoint_dir() -> Path:
    """The directory fair-esm downloads into: `<torch hub dir>/checkpoints`."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def download_esm2(name: str) -> Path:
    """Local path of the fair-esm checkpoint `name`, downloading it (and its contact regression) if absent.

    Same URLs and same cache directory as fair-esm, so files fair-esm fetched are reused and vice versa.
    The contact-regression file is optional for embeddings: failing to fetch it only logs a warning.
    """
    directory = hub_checkpoint_dir()
    target = directory / f"{name}.pt"
    if not target.is_file():
        _download(FAIR_ESM_MODEL_URL.format(name=name), target, name)
    regression = regression_path(target)
    if not regression.is_file():
        try:
            _download(FAIR_ESM_REGRESSION_URL.format(name=name), regression, name)
        except CheckpointError as e:
            logger.warning(
                "contact-regression weights of %s not downloaded (not needed for embeddings): %s", name, e
            )
    return target


def _download(url: str, target: Path, name: str) -> None:
    """Fetch `url` to `target` (torch writes a temporary file and renames it, so no partial file stays)."""
    logger.info("downloading %s to %s", url, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except (OSError, ValueError, RuntimeError) as e:  # URLError/HTTPError are OSErrors
        raise CheckpointError(
            f"could not download {name} from {url} ({first_line(e)}): without internet access, copy the file "
            f"to {target} or pass the path of a local .pt file as the model"
        ) from None
