"""runner: packed FP16 embeddings of protein and DNA sequences on Ray, checked by an FP32 shadow."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runner.output.results import Results

__version__ = "0.1.0"


def open(path: str | Path, model: str | None = None) -> Results:  # noqa: A001 (as zarr.open, h5py.File)
    """Open the output folder of `runner embed --out DIR` for reading: see `runner.output.results.Results`.

    For a multi-model job, `model` names one (as given to --model, or its sub-folder), or pass DIR/<model>.
    Imported lazily so that `import runner` (and the CLI's start) stays light.
    """
    from runner.output.results import open_results

    return open_results(path, model)
