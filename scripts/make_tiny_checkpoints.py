"""Build tiny checkpoints in the real formats, for tests, CI and the README quickstart (no internet needed).

    python scripts/make_tiny_checkpoints.py models/
      -> models/esm2_tiny.pt (+ esm2_tiny-contact-regression.pt)   fair-esm ESM-2 format, random weights
      -> models/dnabert_tiny/                                     DNABERT-S HF layout + BPE tokenizer
      -> models/esm2_hf_tiny/                                     transformers ESM-2 (EsmForMaskedLM) + vocab.txt
      -> models/esmc_tiny/ and models/esmc_tiny.pth               ESM C: transformers layout + EsmcTokenizer, and
                                                                  the same weights in EvolutionaryScale's .pth layout

The embeddings of random weights mean nothing; they exercise the real loading and packed forward code.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def main(out_dir: str) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one shard per tiny model: its "Writing model shards" bar is noise
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    esm_path = _load("tiny_esm2").make_esm2(out / "esm2_tiny.pt")
    dna_path = _load("tiny_dnabert").make_dnabert(out / "dnabert_tiny")
    hf_path = _load("tiny_hf_esm2").make_hf_esm2(out / "esm2_hf_tiny")
    esmc_dir, esmc_pth = _load("tiny_esmc").make_esmc(out)
    print(f"wrote {esm_path}, {dna_path}, {hf_path}, {esmc_dir} and {esmc_pth}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/make_tiny_checkpoints.py OUT_DIR")
    main(sys.argv[1])
