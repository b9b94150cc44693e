"""The one model interface of `runner`: ESM-2 and DNABERT-S each implement it in one file.

A model comes in two halves so that CPU stages never load weights:
- `SequenceCodec` (picklable, no weights): cleans, checks and tokenizes text; runs in the tokenize/pack stage.
- `EmbeddingModel` (an nn.Module holding the weights): a packed forward over concatenated sequences.
The pipeline only ever talks to these two classes; it has no model-specific branches.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from runner.errors import RunnerError
from runner.kernels.attention import FP32_PREFERENCE
from runner.kernels.emulated import fp32_linear

logger = logging.getLogger(__name__)  # a child of "runner": actor-side, see runner.driver.console


@contextmanager
def uninitialised_weights() -> Iterator[None]:
    """Modules built in the block keep their weights as allocated (torch.empty, on CPU): torch.nn.init's fills
    are skipped, for a module whose weights are replaced right after (load_state_dict(assign=True)) or only
    counted. Nothing is computed, and the OS maps a large allocation's pages only when they are written, so a
    650M model's 2.6 GB cost no memory before the checkpoint's tensors replace them.

    Faster than building on the meta device: fair-esm's rotary tables do arithmetic at construction, which on
    meta tensors runs through torch._refs and so imports torch._dynamo on first use (2 to 15 s of start-up on
    the driver's pre-flight check and in every CPU actor, for nothing). The fills are module attributes,
    switched off for the block and put back after it.
    """
    fills = {name: fn for name, fn in vars(torch.nn.init).items()
             if name.endswith("_") and not name.startswith("_") and callable(fn)}
    try:
        for name in fills:
            setattr(torch.nn.init, name, _keep)
        yield
    finally:
        for name, fn in fills.items():
            setattr(torch.nn.init, name, fn)


def _keep(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """An nn.init fill that leaves the tensor as it is (see uninitialised_weights)."""
    return tensor


@dataclass(frozen=True)
class ModelInfo:
    """What the manifest records about a model."""

    name: str  # the name or path the user gave
    family: str  # "esm2" or "dnabert"
    checkpoint: str  # resolved local file or directory the weights came from ("" before download)
    checkpoint_sha256: str  # hash of the weight file(s); "" when not computed
    embed_dim: int  # width of one embedding
    num_layers: int  # transformer layers; --layers take 0..num_layers, or negatives from the end
    parameters: int  # number of weights


def resolve_layers(layers: Sequence[int], num_layers: int, model: str) -> list[int]:
    """Representation layers as indices 0..num_layers, in the order given: 0 is the embeddings, num_layers the
    last layer (after the final LayerNorm, as fair-esm), negatives count from the end (-1 is the last). One
    RunnerError naming the valid range for anything else, or for a layer asked for twice."""
    resolved: list[int] = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -num_layers - 1 <= layer <= num_layers:
            raise RunnerError(
                f"layer {layer} (--layer/--layers) is out of range for {model}: use 0 (embeddings) to {num_layers} "
                f"(the last), "
                f"or -1 to -{num_layers + 1} counting from the end"
            )
        index = int(layer) if layer >= 0 else num_layers + 1 + int(layer)
        if index in resolved:
            given = ",".join(str(g) for g in layers)
            raise RunnerError(f"layer {index} is asked for twice (--layers {given}): list each layer once")
        resolved.append(index)
    if not resolved:
        raise RunnerError("no layer given: pass --layers L[,L...] (e.g. --layers -1)")
    return resolved


# ASCII bytes Python's str.split() treats as whitespace (str.isspace): \t \n \v \f \r, \x1c-\x1f and the space.
_ASCII_SPACE = np.zeros(256, dtype=bool)
_ASCII_SPACE[[c for c in range(128) if chr(c).isspace()]] = True
ASCII_UPPER = np.arange(256, dtype=np.uint8)  # byte -> byte: a-z -> A-Z, what str.upper() does to ASCII
ASCII_UPPER[ord("a") : ord("z") + 1] -= 32


def string_buffers(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The offsets (int64 [n + 1], into the data) and the UTF-8 bytes (uint8) of an Arrow string array, zero copy
    for the bytes. Nulls read as empty strings."""
    n = len(strings)
    width = np.int64 if pa.types.is_large_string(strings.type) else np.int32
    bufs = strings.buffers()
    offsets = np.frombuffer(bufs[1], dtype=width, count=n + 1, offset=strings.offset * np.dtype(width).itemsize)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, dtype=np.uint8)
    return offsets.astype(np.int64), data


def clean_ascii_column(raw: pa.StringArray, clean: Callable[[str], str], translate: np.ndarray,
                       drop_last: int | None) -> pa.StringArray:
    """`clean` of each string of `raw` (an Arrow string array without nulls) as a few numpy operations over the
    bytes, for a `clean` that removes whitespace (str.split), upper-cases, maps bytes through `translate` and drops
    one trailing `drop_last` byte. Strings holding any non-ASCII byte (where str.split and str.upper follow
    Unicode: U+00A0 is whitespace, 'ſ'.upper() is 'S') go through `clean` itself, one by one."""
    n = len(raw)
    offsets, data = string_buffers(raw)
    text = data[offsets[0] : offsets[-1]]
    lengths = np.diff(offsets)
    body = text
    space = np.take(_ASCII_SPACE, body)
    if space.any():  # FASTA line ends are gone already: whitespace inside a sequence is rare
        lengths = lengths - row_sums(space, lengths)
        body = body[~space]
    out = np.take(translate, body)  # uint8: the kept bytes, upper-cased and translated
    new = np.zeros(n + 1, dtype=np.int64)  # offsets into `out`
    np.cumsum(lengths, out=new[1:])
    if drop_last is not None and len(out):
        ends = new[1:][lengths > 0] - 1  # each non-empty string's last byte
        dropped = ends[out[ends] == drop_last]
        if len(dropped):
            mask = np.ones(len(out), dtype=bool)
            mask[dropped] = False
            out = out[mask]
            gone = np.zeros(len(mask) + 1, dtype=np.int64)
            np.cumsum(~mask, out=gone[1:])
            new = new - gone[new]
    cleaned = pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(new.astype(np.int32)), pa.py_buffer(out)])
    if len(text) and text.max() >= 0x80:
        unicode_rows = np.flatnonzero(row_sums(text >= 0x80, np.diff(offsets)) > 0)
        texts = raw.take(pa.array(unicode_rows)).to_pylist()
        mask = np.zeros(n, dtype=bool)
        mask[unicode_rows] = True
        cleaned = pc.replace_with_mask(cleaned, pa.array(mask), pa.array([clean(t) for t in texts], pa.string()))
    return cleaned


def row_sums(flags: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """int64 [n]: how many of each row's `flags` are set; the rows' flags lie one after another (`lengths`)."""
    sums = np.zeros(len(lengths), dtype=np.int64)
    filled = np.flatnonzero(lengths > 0)
    if len(filled):
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        sums[filled] = np.add.reduceat(flags, starts[filled], dtype=np.int64)
    return sums


def valid_column(cleaned: pa.StringArray, valid: frozenset[str], invalid_characters: Callable[[str], str]) -> np.ndarray:
    """bool [n]: whether each cleaned string holds only characters of `valid` (`invalid_characters` returns '').
    One byte lookup over all the bytes when `valid` is ASCII (a non-ASCII byte is then invalid, as its character
    is); else `invalid_characters` one by one."""
    if any(ord(c) >= 0x80 for c in valid):
        return np.array([not invalid_characters(s) for s in cleaned.to_pylist()], dtype=bool)
    invalid = np.ones(256, dtype=bool)
    invalid[[ord(c) for c in valid]] = False
    offsets, data = string_buffers(cleaned)
    bad = np.take(invalid, data[offsets[0] : offsets[-1]])
    if not bad.any():
        return np.ones(len(cleaned), dtype=bool)
    return row_sums(bad, np.diff(offsets)) == 0


class SequenceCodec(ABC):
    """Text side of a model: cleaning, alphabet check and tokenization. Cheap to build and to pickle."""

    kind: str  # "protein" or "dna": which normalisation rules apply
    max_residues: int  # longest residue window the model embeds in one piece
    special_start: int  # special tokens before the residues of each sequence (BOS / [CLS])
    special_end: int  # special tokens after them (EOS / [SEP])
    default_pooling: str  # "mean" (residue tokens), "mean_all" (all tokens) or "cls"
    # Each residue is one token (ESM-2): per-token rows are residues, and overlapping windows of a chunked
    # sequence line up residue by residue (so they can be stitched). False for BPE (DNABERT).
    one_token_per_residue: bool = False

    @abstractmethod
    def clean(self, raw: str) -> str:
        """Normalise raw text: whitespace removed, uppercased, model-specific fixes (trailing '*', U->T)."""

    @abstractmethod
    def invalid_characters(self, seq: str) -> str:
        """The sorted distinct characters of a cleaned sequence the model cannot embed ('' when none)."""

    @abstractmethod
    def encode(self, seq: str) -> np.ndarray:
        """Token ids of a cleaned, valid sequence, special tokens included. int32 [special_start + n + special_end]
        for per-residue alphabets; BPE codecs return however many tokens the residues make."""

    def clean_column(self, raw: pa.StringArray) -> pa.StringArray:
        """`clean` of each string of an Arrow string array (no nulls): the --dedup read task cleans whole runs.
        Codecs override it with a vectorised version that gives the same strings; this one calls `clean`."""
        return pa.array([self.clean(s) for s in raw.to_pylist()], pa.string())

    def valid_column(self, cleaned: pa.StringArray) -> np.ndarray:
        """bool [n]: `invalid_characters(s) == ''` for each cleaned string (overridden with a vectorised version)."""
        return np.array([not self.invalid_characters(s) for s in cleaned.to_pylist()], dtype=bool)


class ResidueCodec(SequenceCodec):
    """A protein alphabet of one token per residue letter between one start and one end token (ESM-2, ESM C):
    the letters are looked up in a byte -> token id table, so encoding a sequence is one numpy gather."""

    kind = "protein"
    special_start = 1  # the start token (<cls>)
    special_end = 1  # the end token (<eos>)
    default_pooling = "mean"  # over the residues, start and end token left out
    one_token_per_residue = True  # chunked windows line up residue by residue and can be stitched
    model_name: str  # the model the error of `encode` names

    def __init__(self, residues: str, token_id: Callable[[str], int], start_id: int, end_id: int) -> None:
        self.start_id = start_id  # token id before the residues
        self.end_id = end_id  # token id after them
        self._valid = frozenset(residues)
        lut = np.full(256, -1, dtype=np.int32)  # byte -> token id, -1 for bytes the model cannot embed
        for ch in residues:
            lut[ord(ch)] = token_id(ch)
        self._lut = lut

    def clean(self, raw: str) -> str:
        """Whitespace removed, uppercased, one trailing stop codon '*' dropped."""
        seq = "".join(raw.split()).upper()
        return seq[:-1] if seq.endswith("*") else seq

    def invalid_characters(self, seq: str) -> str:
        """Sorted distinct characters outside `residues` ('' when the sequence is embeddable)."""
        return "".join(sorted(set(seq) - self._valid))

    def clean_column(self, raw: pa.StringArray) -> pa.StringArray:
        """`clean` over a column in numpy (the same strings; a subclass with its own `clean` keeps it per string)."""
        if type(self).clean is not ResidueCodec.clean:
            return super().clean_column(raw)
        return clean_ascii_column(raw, self.clean, ASCII_UPPER, drop_last=ord("*"))

    def valid_column(self, cleaned: pa.StringArray) -> np.ndarray:
        if type(self).invalid_characters is not ResidueCodec.invalid_characters:
            return super().valid_column(cleaned)
        return valid_column(cleaned, self._valid, self.invalid_characters)

    def encode(self, seq: str) -> np.ndarray:
        """int32 [n + 2]: the start token, one token per residue, the end token."""
        bad = self.invalid_characters(seq)
        if bad:
            raise RunnerError(f"sequence contains characters {self.model_name} cannot embed: {bad}")
        out = np.empty(len(seq) + 2, dtype=np.int32)  # [n + 2]
        out[0] = self.start_id
        out[1:-1] = self._lut[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]  # [n]
        out[-1] = self.end_id
        return out


class EmbeddingModel(torch.nn.Module, ABC):
    """Weights plus a packed forward. One instance per actor, moved to its device and dtype once."""

    info: ModelInfo
    codec: SequenceCodec
    attention_backend: str  # which kernel the forward uses: "flash_attn", "torch_varlen", "flex", "exact"

    @abstractmethod
    def forward_layers(
        self,
        tokens: torch.Tensor,  # int64 [T] token ids of all sequences, concatenated
        positions: torch.Tensor,  # int64 [T] position of each token inside its own sequence
        cu_seqlens: torch.Tensor,  # int32 [B+1] offsets of each sequence in `tokens`
        max_seqlen: int,  # longest sequence in the batch, in tokens
        layers: Sequence[int],  # representation layers (see `resolve_layer`), at least one
    ) -> list[torch.Tensor]:
        """Hidden states of each of `layers`, in that order, from ONE forward: [T, D] each, in the model's dtype.

        Layers below the deepest one requested are kept as the forward passes them (no extra compute, no host
        sync); the forward never runs deeper than the deepest layer asked for. No padding anywhere."""

    def forward_packed(
        self,
        tokens: torch.Tensor,  # int64 [T]
        positions: torch.Tensor,  # int64 [T]
        cu_seqlens: torch.Tensor,  # int32 [B+1]
        max_seqlen: int,
        layer: int,  # representation layer: 0 = embeddings, num_layers or -1 = last
    ) -> torch.Tensor:
        """Hidden states of one `layer` for every token: [T, D] in the model's dtype."""
        return self.forward_layers(tokens, positions, cu_seqlens, max_seqlen, [layer])[0]

    num_layers: int  # transformer layers
    head_dim: int  # channels per attention head

    def resolve_layer(self, layer: int) -> int:
        """`layer` as 0..num_layers (negatives count from the end: -1 -> num_layers); RunnerError otherwise."""
        return resolve_layers([layer], self.num_layers, self.info.name or self.info.family)[0]

    @abstractmethod
    def select_attention(self, device: torch.device) -> str:
        """Pick the fastest attention kernel available for this device, store it and return its name."""

    # Every projection (nn.Linear weight) of a model's forward goes through `self.linear(x, weight, bias)`:
    # F.linear, or for the FP32 shadow on a GPU an FP32-accurate product from tensor cores (fp32_linear).
    linear: Callable[..., torch.Tensor]

    def emulate_fp32(self, math: str) -> None:
        """FP32-accurate projections from tensor cores in an fp32 CUDA model: "fp16x3", "bf16x3" or "tf32x3"
        (see fp32_linear); "ieee" keeps plain FP32 matmuls. Call it after moving the model to its device:
        models may prepare split copies of their weights here.

        The split maths take the attention along: an IEEE FP32 kernel ("nested", "flex") becomes "fp16x3"
        (runner.kernels.fp16x3_attention, as accurate as the split projections) where that kernel runs and passes a
        check against float64 attention; otherwise the IEEE kernel stays, with a warning saying why."""
        self.linear = fp32_linear(math)
        if math == "ieee" or self.attention_backend not in FP32_PREFERENCE:
            return
        from runner.kernels.fp16x3_attention import fp16x3_attention_available, fp16x3_attention_problem

        device = next(self.parameters()).device
        if not fp16x3_attention_available(device):
            return
        problem = fp16x3_attention_problem(device, self.head_dim)
        if problem is not None:
            logger.warning("fp16x3 attention unusable here (%s): the FP32 attention stays %s (IEEE FP32, slower)",
                           problem, self.attention_backend)
            return
        self.attention_backend = "fp16x3"
        logger.info("attention backend fp16x3 (FP32-accurate from FP16 tensor cores, with the %s projections)", math)

    # Fuse the MLP's first projection and its GELU into one GEMM whose epilogue applies a tanh-approximate GELU
    # (half precision on CUDA), where the model supports it: set by the caller, see `fused_gelu_in_use`.
    fused_gelu: bool = False

    @property
    def fused_gelu_in_use(self) -> bool:
        """Whether forwards now run the fused tanh GELU (the model supports it, and its weights are half on CUDA)."""
        return False

    @property
    def compiling(self) -> bool:
        """Whether the forward currently runs compiled layers (False after an eager fallback)."""
        return False

    def use_compile(self, on: bool) -> bool:
        """Compile the forward's layers with torch.compile when `on`; returns whether compiling is in use.
        Models that do not support it run eager and return False."""
        return False
