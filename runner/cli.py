"""The `runner` command line: a thin click layer over `runner.job`.

Expected failures (RunnerError) become one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from runner import __version__
from runner.config import (
    ENGINES,
    LONG_POLICIES,
    POOLINGS,
    PRECISIONS,
    SHADOW_MATHS,
    EmbedConfig,
    load_config_file,
)
from runner.driver.console import configure_console
from runner.driver.signals import JobInterrupted
from runner.errors import RunnerError

# runner.output.export.FORMATS, named here so that `runner --help` does not import numpy (a test keeps them equal).
EXPORT_FORMATS: tuple[str, ...] = ("parquet", "npz", "hdf5", "fair-esm")


class TokenBudget(click.ParamType):
    """`auto` or a positive integer."""

    name = "auto|N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) or value == "auto":
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'auto' nor a number of tokens", param, ctx)


class PoolingList(click.ParamType):
    """Comma-separated poolings, each one of POOLINGS."""

    name = "P[,P...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in POOLINGS]
        if bad or not items:
            self.fail(f"{value!r}: choose from {', '.join(POOLINGS)}, comma-separated (e.g. mean,cls)", param, ctx)
        return items


def model_options(fn: Callable | None = None, *, multiple_models: bool = False) -> Callable:
    """Options shared by every command that runs a model (`multiple_models`: --model may repeat)."""
    if fn is None:
        return functools.partial(model_options, multiple_models=multiple_models)
    model_help = ("ESM-2 name (esm2_t33_650M_UR50D or facebook/esm2_t33_650M_UR50D), DNABERT hub name, .pt file "
                  "or HF dir.")
    if multiple_models:
        model_help += " Repeat to embed with several models (one DIR/<model>/ each)."
    decorators = [
        click.option("--model", "-m", multiple=multiple_models, help=model_help),
        click.option("--gpus", type=int, help="GPUs to use, one embedding actor each (default: all; 0 = CPU)."),
        click.option("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)."),
        click.option("--precision", type=click.Choice(PRECISIONS), help="Compute dtype (default fp16 on GPU, fp32 on CPU)."),
        click.option("--token-budget", type=TokenBudget(), help="Tokens per packed batch, or 'auto' (from GPU memory)."),
        click.option("--layer", type=int, help="Representation layer (default -1: last; 0 = embeddings)."),
        click.option("--layers", metavar="L[,L...]",
                     help="Several layers from one forward, e.g. 0,17,33 or -1,-2 (negatives count from the end)."),
        click.option("--pooling", metavar="P[,P...]", type=PoolingList(),
                     help="mean (residues), mean_all (all tokens), cls (BOS) or max (per-channel over residues); "
                     "several comma-separated, e.g. mean,cls,max."),
        click.option("--max-residues", type=int, help="Longest window embedded at once (default: the model's limit, 1022 for ESM-2)."),
        click.option("--long", type=click.Choice(LONG_POLICIES), help="Longer sequences: truncate (default), chunk, or skip."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of settings; flags win."),
    ]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), fn)


def input_options(fn: Callable) -> Callable:
    """Options about reading inputs."""
    decorators = [
        click.option("--id-column", help="Id column of Parquet/CSV inputs (default: id)."),
        click.option("--seq-column", help="Sequence column of Parquet/CSV inputs (default: sequence)."),
        click.option("--strict", is_flag=True, default=None, help="Fail before any GPU work if any record would be rejected."),
    ]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), fn)


def shadow_options(fn: Callable) -> Callable:
    """The FP32 shadow pool and drift policy."""
    decorators = [
        click.option("--shadow-rate", type=float, help="Fraction re-embedded in FP32 to measure drift (default 0.01; 0 = off)."),
        click.option("--shadow-gpus", type=float, help="GPU share of each shadow actor (default 0.25 on GPUs; 0 = CPU)."),
        click.option("--drift-min-cosine", type=float, help="Per-sequence cosine vs FP32 below which drift is flagged (default 0.99)."),
        click.option("--on-drift", type=click.Choice(["warn", "abort"]), help="What a drift violation does (default warn)."),
        click.option("--shadow-math", type=click.Choice(SHADOW_MATHS),
                     help="FP32 matmuls of a GPU shadow: fp16x3 or tf32x3 (FP32-accurate from tensor cores), "
                     "bf16x3 (coarser, ~2^-16) or ieee (plain FP32). Default fp16x3."),
        click.option("--fp32-layernorm", is_flag=True, default=None, help="Keep LayerNorm in FP32 inside the FP16 model."),
        click.option("--exact-gelu", is_flag=True, default=None,
                     help="fair-esm's erf GELU in the FP16 model, not the faster tanh GELU fused into fc1's GEMM."),
    ]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), fn)


def build_config(config_file: str | None, **flags: Any) -> EmbedConfig:
    """Defaults, then the config file, then the flags that were given."""
    config = EmbedConfig()
    if config_file:
        config = config.with_overrides(load_config_file(config_file))
    if flags.get("token_budget") == "auto":
        flags["token_budget"] = None
        config.token_budget = None
    if flags.get("inputs") == ():
        flags["inputs"] = None
    elif flags.get("inputs") is not None:
        flags["inputs"] = list(flags["inputs"])
    return config.with_overrides(flags)


def run_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into one-line ClickExceptions with the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RunnerError as e:
            if isinstance(e, JobInterrupted):
                # Objects a stop left half-built (Ray's sockets during start-up) are freed at exit: no warnings.
                warnings.simplefilter("ignore", ResourceWarning)
            err = click.ClickException(str(e))
            err.exit_code = e.exit_code
            raise err from None
        except KeyboardInterrupt:  # before the job's own handler was installed (e.g. while importing torch)
            warnings.simplefilter("ignore", ResourceWarning)
            click.echo("interrupted: rerun the same command (complete parts, if any, are kept)", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="runner")
@click.option("-v", "--verbose", count=True,
              help="Also show Ray's and Ray Data's logs (always in DIR/runner.log) and deprecation warnings; -vv debug.")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Embed protein and DNA sequences with ESM-2 and DNABERT-S on one or many GPUs (Ray).

    \b
    Example:
        runner embed proteins/*.fasta --model esm2_t33_650M_UR50D --out emb/ --gpus 8
    """
    configure_console(verbose)
    ctx.obj = {"verbose": verbose}


@cli.command()
@click.argument("inputs", nargs=-1)
@click.option("--out", "-o", help="Output directory (embeddings/, rejects.arrow, manifest.json).")
@model_options(multiple_models=True)
@input_options
@click.option("--chunk-overlap", type=int, help="Residues shared by neighbouring windows with --long chunk (default 128).")
@click.option("--rows-per-part", type=int, help="Rows per Arrow part file (default 16384).")
@click.option("--part-seconds", type=float,
              help="Close a part once its first row is this old, even if not full (default 30): the most a "
                   "finished embedding waits before it is on disk.")
@click.option("--part-writer", type=click.Choice(["driver", "actors", "auto"]),
              help="Who writes the pooled parts: the driver, or each embedding actor (the driver only commits "
                   "them; needs an --out every node shares). Default auto: actors from 8 GPUs on.")
@click.option("--per-token", is_flag=True, default=None,
              help="Also store every residue's vector for each layer (DIR/tokens/; BOS/EOS excluded; large).")
@click.option("--per-token-dtype", type=click.Choice(["float32", "float16"]),
              help="dtype of the per-token vectors (default float32; float16 halves the bytes).")
@shadow_options
@click.option("--compile/--no-compile", "compile_layers", default=None,
              help="torch.compile the model layers (fused kernels; default on GPUs, except a job known to be small: "
                   "FASTA up to 64 MiB with under 2M tokens per GPU; eager on CPU).")
@click.option("--compile-cache/--no-compile-cache", default=None,
              help="Reuse torch.compile's caches across runs (~/.cache/runner/torch-compile; default on).")
@click.option("--engine", type=click.Choice(ENGINES), envvar="RUNNER_ENGINE",
              help="Where the stream runs: ray (a local Ray, or the cluster of --address), in-process (this process, "
                   "one device, no Ray: 15-25 s sooner to start) or auto (default: in-process for a FASTA input under "
                   "2M tokens at 650M, fewer for larger models, with no cluster to join). Also RUNNER_ENGINE.")
@click.option("--no-progress", "progress", flag_value=False, default=None, help="No progress display (neither runner's nor Ray's).")
@click.option("--no-dashboard", "dashboard", flag_value=False, default=None,
              help="Start the local Ray without its dashboard: 2-3 s sooner (docs/running.md); a cluster keeps its own.")
@click.option("--overwrite", is_flag=True, default=None, help="Delete --out's previous outputs instead of resuming them.")
@click.option("--dedup", is_flag=True, default=None,
              help="Embed each distinct sequence once; its repeats get a copy of its row (same vector).")
@run_command
def embed(inputs: tuple[str, ...], config_file: str | None, **flags: Any) -> None:
    """Embed every sequence of INPUT... (FASTA, Parquet, CSV; files, globs or directories).

    Writes DIR/embeddings/part-NNNNN.arrow (id, length, truncated, embedding as float32; with several
    --layers/--pooling one column per pair, e.g. layer33_mean), DIR/rejects.arrow (id, source, reason),
    DIR/manifest.json, and with --per-token DIR/tokens/ (see docs/outputs.md).

    \b
    Examples:
        runner embed proteins/*.fasta --model esm2_t33_650M_UR50D --out emb/ --gpus 8
        runner embed tests/data/some_proteins.fasta --model models/esm2_tiny.pt --out emb/ --gpus 0
        runner embed reads.parquet --seq-column dna --model zhihan1996/DNABERT-S --out dna/
        runner embed proteins.fasta --model facebook/esm2_t33_650M_UR50D --out emb/   # transformers ESM-2
        runner embed metagenome/*.fasta --dedup --model esm2_t33_650M_UR50D --out emb/
        runner embed p.fasta -m esm2_t33_650M_UR50D -o emb/ --layers 0,32,33 --pooling mean,cls --per-token
    """
    from runner.job import run_embed

    models = flags.pop("model") or ()
    verbose = (click.get_current_context().find_root().obj or {}).get("verbose", 0)
    config = build_config(config_file, inputs=inputs, model=models[0] if len(models) == 1 else None,
                          verbose=verbose or None, **flags)
    jobs = [config]
    if len(models) > 1:
        if not config.out:
            raise RunnerError("no output directory given: pass --out DIR")
        # One output folder per model; the input is read once per model (reading is cheap next to the GPUs).
        jobs = [dataclasses.replace(config, model=m, out=str(Path(config.out) / model_folder(m))) for m in models]
    for job in jobs:
        report = run_embed(job)
        if report.already_complete:
            click.echo(f"already complete: {report.rows_written:,} embeddings in {report.out_dir} (nothing to do; "
                       "--overwrite starts over)", err=True)
            continue
        shadow = report.shadow or {}
        checked = f", shadow {shadow['compared']:,} compared, {shadow['violations']:,} violations" if shadow else ""
        click.echo(
            f"{report.rows_written:,} embeddings, {report.rejects:,} rejects, {report.truncated:,} truncated "
            f"-> {report.out_dir} ({report.tokens_per_second:,.0f} tok/s, {report.wall_seconds:.1f}s{checked})",
            err=True,
        )


def model_folder(model: str) -> str:
    """Output sub-folder of one model in a multi-model job: its file/dir stem or hub name, made path-safe."""
    path = Path(model)
    name = path.stem if path.suffix == ".pt" else path.name if path.exists() else model
    return name.replace("/", "_").replace(":", "_") or "model"


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", "-m", required=True, help="ESM-2 name (fair-esm or facebook/esm2_*), DNABERT hub name, .pt file or HF dir (as for embed).")
@click.option("--sample", type=int, default=1000, show_default=True, help="Sequences compared (reservoir sample).")
@click.option("--precision", type=click.Choice(["fp16", "bf16"]), help="Precision checked against fp32 (default fp16 on GPU, bf16 on CPU).")
@click.option("--fp32-layernorm", is_flag=True, help="Also run it with LayerNorm in fp32: does that recover it, at what cost?")
@click.option("--exact-gelu", is_flag=True, help="fair-esm's erf GELU in the low precision, as `embed --exact-gelu`.")
@click.option("--out", "-o", "out_file", type=click.Path(dir_okay=False), help="JSON report (default validate-<precision>.json).")
@click.option("--min-cosine", type=float, default=0.99, show_default=True, help="A cosine vs fp32 below this fails (exit 4).")
@click.option("--gpus", type=int, help="0 = CPU, 1 = one GPU (default 1 when CUDA is available).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--id-column", default="id", help="Id column of Parquet/CSV inputs.")
@click.option("--seq-column", default="sequence", help="Sequence column of Parquet/CSV inputs.")
@click.option("--layer", type=int, default=-1, help="Representation layer (default -1: last).")
@click.option("--pooling", type=click.Choice(POOLINGS), help="mean, mean_all or cls (default: the model's).")
@click.option("--max-residues", type=int, help="Longer sequences are truncated to this (default: the model's limit).")
@click.option("--token-budget", type=int, help="Tokens per packed batch (default 4096 on CPU, from free memory on GPU).")
@run_command
def validate(inputs: tuple[str, ...], out_file: str | None, **flags: Any) -> None:
    """Check a low precision against FP32 on a length-stratified sample of INPUT... before a big run.

    Prints per length tercile (short/medium/long) the min/mean/max cosine, mean |diff|, relative std and
    L2-norm differences and the ids below --min-cosine, and writes the same as JSON. Exits 4 when a
    sampled sequence is below --min-cosine (with --fp32-layernorm: when the fp32-LayerNorm variant is).

    \b
    Examples:
        runner validate proteins/*.fasta --model esm2_t33_650M_UR50D --precision fp16 --fp32-layernorm
        runner validate tests/data/some_proteins.fasta --model models/esm2_tiny.pt --gpus 0 --sample 50
    """
    from runner.validate import ValidateSettings, failure, format_table, run_validate, write_report

    settings = ValidateSettings(inputs=list(inputs), **flags)
    report = run_validate(settings)
    path = Path(out_file or f"validate-{report['precision']}.json")
    write_report(report, path)
    click.echo(format_table(report))
    click.echo(f"report: {path}", err=True)
    if not report["passed"]:
        raise failure(report, path)


def results_options(fn: Callable) -> Callable:
    """Options of commands that read a job's output folder."""
    decorators = [
        click.option("--model", "-m", help="For a multi-model job: the model to read (as given to --model, or its sub-folder)."),
    ]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), fn)


@cli.command("export")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "-f", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
              help="parquet (the pooled table), npz or hdf5 (pooled and per-token arrays), fair-esm (extract.py's .pt files).")
@click.option("--to", "-o", "to", required=True, type=click.Path(),
              help="Output file (parquet, npz, hdf5) or folder (fair-esm).")
@results_options
@click.option("--overwrite", is_flag=True, help="Replace an existing --to file (fair-esm: write into a non-empty folder).")
@run_command
def export_command(directory: str, fmt: str, to: str, model: str | None, overwrite: bool) -> None:
    """Write the embeddings in DIRECTORY (the --out of `runner embed`) to --to in another format.

    Rows are in input order; every format streams part by part (bounded memory). Column names are those
    of the parts: `embedding`, or `layer{L}_{pooling}` for several layers/poolings. docs/reading.md has the
    layouts. --format fair-esm writes one file per sequence: fine for thousands, not for millions.

    \b
    Examples:
        runner export emb/ --format parquet --to emb.parquet
        runner export emb/ --format hdf5 --to emb.h5
        runner export emb/ --format fair-esm --to esm_out/     # then torch.load("esm_out/<id>.pt")
        runner export multi/ --model esm2_t33_650M_UR50D --format npz --to 650m.npz
    """
    import runner
    from runner.output.export import export, human_bytes

    results = runner.open(directory, model)
    summary = export(results, fmt, to, overwrite)
    for note in summary.notes:
        click.echo(f"note: {note}", err=True)
    what = f"{summary.files:,} files" if summary.files != 1 else human_bytes(summary.bytes)
    click.echo(f"{summary.rows:,} rows -> {summary.path} ({fmt}, {what})", err=True)


@cli.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@run_command
def verify(directory: str) -> None:
    """Check an output DIRECTORY: every part's checksum and structure, the counts, each input at most once.

    Reads every part and per-token file in full (its CRC-32 against the one its writer computed, finite vectors),
    compares the rows and rejects with the manifest, and checks that no input record is stored twice and that
    each stored row's per-token arrays are there exactly once. Prints one line per
    problem and exits 6 when there is any (0 when all is well). A multi-model output is checked per model.

    \b
    Examples:
        runner verify emb/
        runner verify both/      # each DIR/<model>/ of a multi-model job
    """
    from runner.output.verify import VerifyFailed, output_dirs, verify_dir

    problems = 0
    for out_dir in output_dirs(Path(directory)):
        report = verify_dir(out_dir)
        for note in report.notes:
            click.echo(f"note: {note}", err=True)
        for problem in report.problems:
            click.echo(f"problem: {problem}", err=True)
        problems += len(report.problems)
        if report.ok:
            tokens = (f", {report.token_files:,} per-token files ({report.token_rows:,} rows)"
                      if report.token_files else "")
            click.echo(f"ok: {out_dir}: {report.parts:,} parts, {report.rows:,} rows, {report.rejects:,} rejects"
                       f"{tokens}, {(report.bytes + report.token_bytes) / 2**20:,.1f} MiB checked")
    if problems:
        raise VerifyFailed(f"{problems} problem(s) found in {directory} (listed above): rerun the job's command to "
                           "redo missing or corrupt files (if it says 'already complete', delete the corrupt file "
                           "first)")


def main() -> None:
    """The `runner` command. Once `embed` has finished (its outputs closed, the manifest final), or any command that
    started a local Ray, the process ends at once instead of waiting on Ray's graceful stop and Python's teardown
    (runner.driver.ray_session.end_now)."""
    try:
        cli(prog_name="runner")
    except SystemExit as e:
        from runner.driver.ray_session import end_now, local_ray_processes, ray_started_here

        # also a local Ray still starting (a signal during start-up); and any `embed` (runner.job is imported for it
        # alone), whose outputs are closed by now: an in-process job's interpreter teardown (torch's) took 1.2-1.4 s
        if local_ray_processes() or ray_started_here() or "runner.job" in sys.modules:
            end_now(e.code)
        raise


if __name__ == "__main__":
    main()
