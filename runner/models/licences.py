"""Which licence the weights of a known model name come under: one table, recorded in each job's manifest.

Only names that identify one published set of weights are listed (fair-esm names, hub names). A local file
or directory gets no entry: runner cannot tell where its weights came from. Each entry names where the
licence is stated and whether that statement was read at its source (`confirmed`) or only second-hand;
docs/models.md cites the sources and says what could not be confirmed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Licence:
    """The licence a model's weights are published under, and where that is stated."""

    name: str  # licence name as its publisher writes it ("MIT", "Cambrian Open License", ...)
    source: str  # URL of the statement
    confirmed: bool  # True: read at the source itself; False: second-hand or inferred (see `note`)
    note: str = ""  # what is uncertain, or conditions worth knowing before use


_ESM2_MIT = Licence(
    "MIT",
    "https://github.com/facebookresearch/esm#license",
    True,
    "fair-esm's README and package metadata (fair-esm 2.0.0: License: MIT); the facebook/esm2_* hub cards "
    "carry the same MIT tag",
)
_CAMBRIAN_OPEN = Licence(
    "Cambrian Open License",
    "https://github.com/evolutionaryscale/esm/blob/main/LICENSE.md",
    True,
    "EvolutionaryScale/esm LICENSE.md: ESM C 300M (incl. weights) under the Cambrian Open License Agreement "
    "(commercial use allowed; releases built on it keep its terms and the ESM name)",
)
_CAMBRIAN_NON_COMMERCIAL = Licence(
    "Cambrian Non-Commercial License",
    "https://github.com/evolutionaryscale/esm/blob/main/LICENSE.md",
    True,
    "EvolutionaryScale/esm LICENSE.md: ESM C 600M (incl. weights) under the Cambrian Non-Commercial License "
    "Agreement: no commercial use of these weights",
)
_BIOHUB_MIT = Licence(
    "MIT",
    "https://github.com/Biohub/esm#licenses",
    False,
    "the Biohub/esm README states its models are available under the MIT license and the biohub/ESMC-6B card "
    "lists mit (plus third-party notices); this model's own hub card could not be read here",
)
_DNABERT = Licence(
    "Apache-2.0",
    "https://huggingface.co/zhihan1996/DNABERT-2-117M",
    False,
    "not confirmed: the DNABERT-2/DNABERT-S READMEs state no licence; the DNABERT-2 hub repository holds a "
    "LICENSE file (not read here) and third-party mirrors of DNABERT-S declare Apache-2.0; check before use",
)

_ESM2_NAMES = (
    "esm2_t6_8M_UR50D",
    "esm2_t12_35M_UR50D",
    "esm2_t30_150M_UR50D",
    "esm2_t33_650M_UR50D",
    "esm2_t36_3B_UR50D",
    "esm2_t48_15B_UR50D",
)

# Model name (exactly as the user gives it) -> licence of its weights. The short ESM C names follow the
# EvolutionaryScale `esm` package, where esmc_300m / esmc_600m are the 2024-12 weights.
KNOWN_LICENCES: dict[str, Licence] = {
    **{name: _ESM2_MIT for name in _ESM2_NAMES},
    **{f"facebook/{name}": _ESM2_MIT for name in _ESM2_NAMES},
    "esmc_300m": _CAMBRIAN_OPEN,
    "EvolutionaryScale/esmc-300m-2024-12": _CAMBRIAN_OPEN,
    "esmc_600m": _CAMBRIAN_NON_COMMERCIAL,
    "EvolutionaryScale/esmc-600m-2024-12": _CAMBRIAN_NON_COMMERCIAL,
    "biohub/ESMC-300M": _BIOHUB_MIT,
    "biohub/ESMC-600M": _BIOHUB_MIT,
    "zhihan1996/DNABERT-S": _DNABERT,
    "zhihan1996/DNABERT-2-117M": _DNABERT,
}


def licence_of(name: str) -> Licence | None:
    """The licence of a known model name; None for local paths and names not in the table."""
    return KNOWN_LICENCES.get(name)


def licence_record(name: str) -> dict[str, Any] | None:
    """The manifest's `model.licence` entry: the Licence as a dict, or None when the name is not known."""
    licence = licence_of(name)
    return asdict(licence) if licence is not None else None
