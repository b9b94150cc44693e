"""The one settings object of a job, and how YAML files and flags fill it.

Every stage takes what it needs from an `EmbedConfig`; nothing reads the environment or global state
except `resolve_precision` (the documented `RUNNER_DISABLE_FP16` rollback switch).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from runner.errors import RunnerError

Precision = Literal["fp16", "bf16", "fp32"]
LongPolicy = Literal["truncate", "chunk", "skip"]
Pooling = Literal["mean", "mean_all", "cls", "max"]
# How the FP32 shadow's matmuls run on a GPU (runner.kernels.emulated.fp32_linear). fp16x3 and tf32x3 are
# FP32-accurate (~2^-22) from tensor cores; bf16x3 is coarser (~2^-16); ieee is plain FP32 on CUDA cores.
ShadowMath = Literal["fp16x3", "bf16x3", "tf32x3", "ieee"]
SHADOW_MATHS: tuple[str, ...] = ("fp16x3", "bf16x3", "tf32x3", "ieee")

PRECISIONS: tuple[str, ...] = ("fp16", "bf16", "fp32")
LONG_POLICIES: tuple[str, ...] = ("truncate", "chunk", "skip")
# mean: residues (specials excluded); mean_all: all tokens; cls: the BOS/[CLS] vector; max: per-channel max over residues
POOLINGS: tuple[str, ...] = ("mean", "mean_all", "cls", "max")
# Where a job's stream runs (EmbedConfig.engine): on Ray, in the runner process, or chosen by the job's size
ENGINES: tuple[str, ...] = ("auto", "ray", "in-process")


@dataclass
class EmbedConfig:
    """Everything `runner embed` needs; YAML keys and CLI flags use these names (dashes or underscores)."""

    inputs: list[str] = field(default_factory=list)  # FASTA/Parquet/CSV files, globs or directories
    model: str = ""  # ESM-2 / DNABERT hub name, a fair-esm .pt file, or a local HF directory
    out: str = ""  # output directory: embeddings/, rejects.arrow, manifest.json
    gpus: int | None = None  # embedding actors, one GPU each; None = every GPU Ray sees; 0 = CPU
    address: str | None = None  # Ray cluster to join; None = RAY_ADDRESS or start a local Ray
    # "ray": the stream runs on Ray (a local one, or --address); "in-process": in the runner process, one device,
    # no Ray; "auto": in-process for a small job with no cluster to join (runner.driver.in_process).
    engine: Literal["auto", "ray", "in-process"] = "auto"
    precision: Precision | None = None  # compute dtype; None = fp16 on GPU, fp32 on CPU
    token_budget: int | None = None  # tokens per packed batch; None = sized from free GPU memory
    layer: int = -1  # representation layer; -1 = last (after the final LayerNorm, as fair-esm)
    # several representation layers from one forward (0 = embeddings, negatives from the end); None = [layer]
    layers: list[int] | None = None
    # poolings stored per layer (POOLINGS); None = the model's default (ESM-2: mean, DNABERT: mean_all)
    pooling: list[Pooling] | None = None
    per_token: bool = False  # also store every residue's vector per layer (DIR/tokens/, written by the actors)
    per_token_dtype: Literal["float32", "float16"] = "float32"  # dtype of the stored per-token vectors
    max_residues: int | None = None  # longest window one forward sees; None = the model's limit
    long: LongPolicy = "truncate"  # what to do with sequences longer than max_residues
    chunk_overlap: int = 128  # residues shared by neighbouring windows when long == "chunk"
    strict: bool = False  # any reject fails the job before GPU work starts
    id_column: str = "id"  # id column of Parquet/CSV inputs
    seq_column: str = "sequence"  # sequence column of Parquet/CSV inputs
    rows_per_part: int = 16384  # rows per Arrow part file; bounds driver memory
    # A part is closed (on disk, complete) once its first row has waited this long, even if not full: the
    # bound on how long a finished embedding can wait before it is on disk (plus 1 s of clock resolution).
    part_seconds: float = 30.0
    # Who writes the pooled parts: "driver" (every vector travels to the driver, which writes and checksums the
    # parts: ~80k short rows/s, ~19 H200s), "actors" (each embedding actor writes the parts of its batches and
    # the driver only commits them: runner.output.staged; --out must be shared by every node), "auto": actors
    # from 8 embedding actors on (docs/scaling.md).
    part_writer: Literal["driver", "actors", "auto"] = "auto"
    records_per_block: int = 2048  # records per stream block between CPU stages
    cpu_actors: int = 1  # embedding actors when running on CPU (gpus == 0)
    pack_cpus: float = 0.5  # CPUs reserved by each tokenize/pack task (<1 lets them share a core)
    progress: bool = True  # a live progress display on stderr (a plain line every few seconds if not a terminal)
    # Start a local Ray with its dashboard (users watch jobs there); False saves its start, 2-3 s (docs/running.md).
    # A cluster joined with --address keeps whatever dashboard it runs.
    dashboard: bool = True
    verbose: int = 0  # 1: Ray's and Ray Data's logs on the terminal too (always in DIR/runner.log); 2: debug
    fp32_layernorm: bool = False  # keep LayerNorm in fp32 inside an fp16/bf16 model (drift fix, some cost)
    # fair-esm's erf GELU as its own pass in an fp16/bf16 GPU model; False: ESM-2's fc1 and a tanh-approximate
    # GELU run as one GEMM (faster; |GELU difference| <= 4.7e-4, below FP16 rounding of most activations).
    exact_gelu: bool = False
    # torch.compile the layers (fused LayerNorm/rotary/GELU); None = on GPUs unless the job is known to be small
    compile_layers: bool | None = None
    # Keep torch.compile's caches in runner's cache dir (~/.cache/runner/torch-compile): later runs load the
    # compiled layers instead of compiling again. False: torch's default (a temporary directory).
    compile_cache: bool = True
    shadow_rate: float = 0.01  # fraction of sequences re-embedded in FP32 by the shadow pool; 0 = off
    shadow_gpus: float | None = None  # GPU share of each shadow actor; None = 0.25 on GPU runs; 0 = CPU
    shadow_actors: int | None = None  # shadow actors; None = one per GPU (beside each embedder), 1 on CPU
    shadow_queue: int = 4  # shadow batches in flight per shadow actor before samples are shed
    shadow_batch_tokens: int = 32768  # sampled tokens gathered into one shadow batch (bigger = cheaper FP32)
    shadow_math: ShadowMath = "fp16x3"  # how a GPU shadow's FP32 matmuls run (SHADOW_MATHS)
    drift_min_cosine: float = 0.99  # a sampled sequence below this cosine vs FP32 is a drift violation
    on_drift: Literal["warn", "abort"] = "warn"  # what a drift violation does
    overwrite: bool = False  # clear --out's previous outputs instead of resuming them
    # Embed each distinct cleaned sequence once; later records of it get a copy of its row (runner.input.dedup).
    dedup: bool = False

    def __post_init__(self) -> None:
        # YAML and flags give "0,17,33" / "mean,cls" or a single value; the config always holds lists.
        self.layers = _int_list(self.layers, "layers")
        if self.pooling is not None:
            items = self.pooling.split(",") if isinstance(self.pooling, str) else list(self.pooling)
            self.pooling = [str(p).strip() for p in items if str(p).strip()] or None  # type: ignore[misc]

    def layer_list(self) -> list[int]:
        """The requested layers as given (unresolved): --layers, else [--layer]."""
        return list(self.layers) if self.layers else [self.layer]

    def pooling_list(self, default: str) -> list[str]:
        """The requested poolings: --pooling, else the model's `default`."""
        return list(self.pooling) if self.pooling else [default]

    def with_overrides(self, overrides: dict[str, Any]) -> EmbedConfig:
        """A copy with every non-None override applied (flags win over the config file)."""
        known = {f.name for f in dataclasses.fields(self)}
        clean = {k.replace("-", "_"): v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(clean) - known)
        if unknown:
            raise RunnerError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **clean)

    def validate(self) -> EmbedConfig:
        """Check values a user can get wrong; raise one RunnerError naming the fix."""
        if not self.inputs:
            raise RunnerError("no input given: pass FASTA/Parquet/CSV files, globs or directories")
        if not self.model:
            raise RunnerError("no model given: pass --model esm2_t33_650M_UR50D (or a .pt / HF directory path)")
        if not self.out:
            raise RunnerError("no output directory given: pass --out DIR")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise RunnerError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.long not in LONG_POLICIES:
            raise RunnerError(f"--long must be one of {', '.join(LONG_POLICIES)}, not {self.long!r}")
        for pooling in self.pooling or []:
            if pooling not in POOLINGS:
                raise RunnerError(f"--pooling takes {', '.join(POOLINGS)} (comma-separated), not {pooling!r}")
        if self.pooling and len(set(self.pooling)) != len(self.pooling):
            raise RunnerError(f"--pooling {','.join(self.pooling)} lists a pooling twice: list each once")
        if self.per_token_dtype not in ("float32", "float16"):
            raise RunnerError(f"--per-token-dtype must be float32 or float16, not {self.per_token_dtype!r}")
        if self.layers is not None and self.layer != -1:
            raise RunnerError("--layer and --layers both given: use --layers L[,L...] alone")
        if self.gpus is not None and self.gpus < 0:
            raise RunnerError("--gpus must be 0 (CPU) or more")
        if self.token_budget is not None and self.token_budget < 8:
            raise RunnerError("--token-budget must be at least 8 tokens (or 'auto')")
        if self.max_residues is not None and self.max_residues < 1:
            raise RunnerError("--max-residues must be at least 1")
        if self.max_residues is not None and self.long == "chunk" and self.chunk_overlap >= self.max_residues:
            raise RunnerError(
                f"--chunk-overlap {self.chunk_overlap} must be smaller than --max-residues, {self.max_residues} "
                "residues: lower --chunk-overlap (default 128)"
            )
        if self.chunk_overlap < 0:
            raise RunnerError("--chunk-overlap must be 0 or more")
        if not 0 <= self.shadow_rate <= 1:
            raise RunnerError("--shadow-rate must be between 0 and 1 (0 turns the shadow off)")
        if self.shadow_gpus is not None and not 0 <= self.shadow_gpus < 1:
            raise RunnerError("--shadow-gpus must be a GPU share in [0, 1), e.g. 0.25 (0 = CPU)")
        if self.shadow_math not in SHADOW_MATHS:
            raise RunnerError(f"--shadow-math must be one of {', '.join(SHADOW_MATHS)}, not {self.shadow_math!r}")
        if self.shadow_batch_tokens < 1:
            raise RunnerError("--shadow-batch-tokens must be at least 1")
        if self.on_drift not in ("warn", "abort"):
            raise RunnerError(f"--on-drift must be warn or abort, not {self.on_drift!r}")
        if not -1 <= self.drift_min_cosine <= 1:
            raise RunnerError("--drift-min-cosine must be a cosine between -1 and 1")
        if self.engine not in ENGINES:
            raise RunnerError(f"--engine must be auto, ray or in-process, not {self.engine!r}")
        if self.engine == "in-process" and self.address:
            raise RunnerError("--engine in-process runs without Ray, so it cannot join --address: drop one of them")
        if self.part_writer not in ("driver", "actors", "auto"):
            raise RunnerError(f"--part-writer must be driver, actors or auto, not {self.part_writer!r}")
        if not self.part_seconds > 0:
            raise RunnerError("--part-seconds must be more than 0 (seconds a part may stay open)")
        if self.rows_per_part < 1 or self.records_per_block < 1 or self.cpu_actors < 1:
            raise RunnerError("rows_per_part, records_per_block and cpu_actors must be at least 1")
        return self


def _int_list(value: Any, name: str) -> list[int] | None:
    """None, an int, "0,17,33" or a list of ints as a list of ints; RunnerError naming the setting otherwise."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        out = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise RunnerError(f"--{name} takes whole numbers separated by commas, e.g. 0,17,33 or -1; not {value!r}") from None
    if not out:
        raise RunnerError(f"--{name} is empty: give at least one layer, e.g. --{name} -1")
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML file, as a dict of EmbedConfig field names."""
    p = Path(path)
    if not p.is_file():
        raise RunnerError(f"config file {p} not found: check the --config path")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "syntax error"
        raise RunnerError(f"config file {p} is not valid YAML ({first}): fix the file") from None
    if not isinstance(data, dict):
        raise RunnerError(f"config file {p} must hold a mapping of setting: value")
    settings = {str(k).replace("-", "_"): v for k, v in data.items()}
    if settings.get("token_budget") == "auto":
        settings["token_budget"] = None  # the default: sized from GPU memory
    types = typing.get_type_hints(EmbedConfig)
    unknown = sorted(set(settings) - set(types))
    if unknown:
        raise RunnerError(
            f"config file {p}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(types))}"
        )
    return {key: parse_setting(key, value, types[key], f"config file {p}") for key, value in settings.items()}


# Strings a boolean setting accepts, as click parses a BOOL flag value (case-insensitive).
TRUE_STRINGS = ("1", "true", "t", "yes", "y", "on")
FALSE_STRINGS = ("0", "false", "f", "no", "n", "off")


def parse_setting(key: str, value: Any, kind: Any, where: str) -> Any:
    """A config-file value checked and converted to its field's type, as click converts a flag's text.

    YAML already gives numbers and booleans; a string where a number belongs is parsed as click would
    ("12", "0.5"), a boolean takes YAML's true/false or the strings click accepts (true/false, yes/no, on/off,
    1/0, t/f, y/n: so `strict: "false"` is False), and a choice must be one of its values. Anything else is one
    RunnerError naming the setting, the value and what it takes. Ranges are checked by EmbedConfig.validate,
    the same checks as the flags.
    """
    if value is None:
        if type(None) in typing.get_args(kind):
            return None
        raise RunnerError(f"{where}: {key} needs a value, not null")
    options = [t for t in typing.get_args(kind) if t is not type(None)] if typing.get_origin(kind) in (
        typing.Union, types.UnionType) else [kind]
    kind = options[0]
    name = key.replace("_", "-")
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise RunnerError(f"{where}: {key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if text in TRUE_STRINGS or text in FALSE_STRINGS:
            return text in TRUE_STRINGS
        raise RunnerError(f"{where}: {key}: {value!r} is not a boolean: use true or false (like --{name})")
    if kind is int or kind is float:
        numbers = (int,) if kind is int else (int, float)  # a float where a whole number belongs is refused
        if isinstance(value, numbers) and not isinstance(value, bool):
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(value.strip())
            except ValueError:
                pass
        what = "a whole number" if kind is int else "a number"
        raise RunnerError(f"{where}: {key}: {value!r} is not {what} (like --{name})")
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RunnerError(f"{where}: {key}: {value!r} is not a text value (like --{name})")
    if typing.get_origin(kind) is list and typing.get_args(kind)[0] is str:  # inputs: one path or a list of paths
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            return list(items)
        raise RunnerError(f"{where}: {key}: {value!r} is not a path or a list of paths")
    if typing.get_origin(kind) is list:  # layers, pooling: a YAML list or the flag's "0,17,33" / "mean,cls"
        if isinstance(value, (list, str, int)) and not isinstance(value, bool):
            return value  # EmbedConfig.__post_init__ makes it a list, validate() checks its values
        raise RunnerError(f"{where}: {key}: {value!r} is not a list: give [a, b] or a,b (like --{name})")
    return value


def resolve_precision(requested: str | None, on_gpu: bool) -> Precision:
    """The compute precision: the request, else fp16 on GPU / fp32 on CPU; RUNNER_DISABLE_FP16 forces fp32."""
    precision = requested or ("fp16" if on_gpu else "fp32")
    if os.environ.get("RUNNER_DISABLE_FP16", "") not in ("", "0") and precision != "fp32":
        warnings.warn(
            f"RUNNER_DISABLE_FP16 is set: computing in fp32 instead of {precision} (slower, reference numerics)",
            stacklevel=2,
        )
        precision = "fp32"
    return precision  # type: ignore[return-value]
