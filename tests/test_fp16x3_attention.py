"""The FP16x3 flash-attention kernel (runner.kernels.fp16x3_attention): FP32-accurate over packed sequences.

On the CPU the Triton program runs in Triton's interpreter (TRITON_INTERPRET=1: the same program evaluated with
NumPy, FP16 operands and FP32 sums as on tensor cores), so the splitting, scaling, online softmax and the
per-sequence blocks are checked without a GPU. The GPU tests run the compiled kernel at ESM-2 and DNABERT shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runner.kernels.attention import _exact, alibi_slopes, varlen_attention
from runner.kernels.fp16x3_attention import column_scale, fp16x3_attention, fp16x3_attention_available


def _packed(lengths: list[int], heads: int, head_dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v [T, H, hd] (v a strided view, as the models hand it over) and cu_seqlens int32 [B+1]."""
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qkv = torch.randn(int(cu[-1]), 3, heads, head_dim, generator=gen) * 3  # logits of a few units, as in ESM-2
    q, k, v = qkv.unbind(1)
    return q.contiguous(), k.contiguous(), v, cu


def _relative_error(out: torch.Tensor, truth: torch.Tensor) -> float:
    return ((out.double() - truth).abs().max() / truth.abs().max()).item()


# Triton reads TRITON_INTERPRET when it is imported (its own library functions are @jit-decorated then), and
# torch may import it first: the interpreted runs happen in a fresh interpreter process.
_CHILD = """
import sys
import torch
from runner.kernels.fp16x3_attention import fp16x3_attention
cases = torch.load(sys.argv[1])
torch.save([fp16x3_attention(*case[:-1], config=case[-1]) for case in cases], sys.argv[2])
"""
SMALL_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16}  # several blocks per sequence at test sizes
SCALE_24, SCALE_16 = 24**-0.5, 16**-0.5


def _cases() -> dict[str, tuple]:
    """Inputs per case: q, k, v, cu_seqlens, max_seqlen, scale, slopes, launch config."""
    # A length-1 sequence, lengths off the block sizes, one spanning many key blocks; head width 24 is padded.
    lengths = [5, 70, 1, 33, 130]
    q, k, v, cu = _packed(lengths, heads=3, head_dim=24)
    # Queries and keys of 1e5 and 1e-5 (products near 1), values of 1e6 in one channel and 1e-6 in another:
    # unscaled, FP16 would overflow (> 65504) or flush them to zero.
    wide_lengths = [40, 90]
    wq, wk, wv, wcu = _packed(wide_lengths, heads=2, head_dim=16, seed=1)
    wv = wv.clone()
    wv[..., 0] *= 1e6
    wv[..., 1] *= 1e-6
    return {
        "plain": (q, k, v, cu, max(lengths), SCALE_24, None, SMALL_BLOCKS),
        "alibi": (q, k, v, cu, max(lengths), SCALE_24, alibi_slopes(3), SMALL_BLOCKS),
        "wide_range": (wq * 1e5, wk * 1e-5, wv, wcu, max(wide_lengths), SCALE_16, None, SMALL_BLOCKS),
    }


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[tuple, torch.Tensor]]:
    """Each case's inputs and the kernel's output, computed by Triton's interpreter in a child process."""
    pytest.importorskip("triton", minversion="3.9", reason="3.6's interpreter cannot run loops bounded by a loaded value")
    folder = tmp_path_factory.mktemp("fp16x3_attention")
    cases = _cases()
    torch.save(list(cases.values()), folder / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", _CHILD, str(folder / "cases.pt"), str(folder / "out.pt")],
                   env=env, check=True, timeout=600)
    outputs = torch.load(folder / "out.pt")
    return {name: (case, out) for (name, case), out in zip(cases.items(), outputs, strict=True)}


@pytest.mark.parametrize("case", ["plain", "alibi"])
def test_interpreted_kernel_is_fp32_accurate_where_fp16_attention_is_not(interpreted: dict, case: str) -> None:
    (q, k, v, cu, _, scale, slopes, _), out = interpreted[case]
    truth = _exact(q.double(), k.double(), v.double(), cu, scale, slopes)  # float64, one sequence at a time
    ieee = _exact(q, k, v, cu, scale, slopes)
    fp16 = _exact(q.half().float(), k.half().float(), v.half().float(), cu, scale, slopes)

    assert out.shape == q.shape and out.dtype == torch.float32
    assert _relative_error(out, truth) < 4e-6  # measured 1.1e-6 (1.4e-6 with ALiBi)
    assert _relative_error(ieee, truth) < 4e-6  # IEEE FP32 itself: 1.6e-6
    assert _relative_error(fp16, truth) > 1e-3  # what one FP16 product per pair would give: 2.8e-3


def test_interpreted_kernel_scales_values_far_outside_fp16s_range(interpreted: dict) -> None:
    (q, k, v, cu, _, scale, _, _), out = interpreted["wide_range"]
    truth = _exact(q.double(), k.double(), v.double(), cu, scale, None)
    assert torch.isfinite(out).all()
    for channel in range(16):  # every channel to FP32 accuracy relative to its own size
        assert _relative_error(out[..., channel], truth[..., channel]) < 4e-6, channel


def test_column_scale_is_a_power_of_two_per_head_and_channel() -> None:
    v = torch.randn(50, 3, 8) * torch.logspace(-20, 20, 8)  # channels of very different sizes
    v[:, 1, 2] = 0.0  # a channel of zeros must not divide by zero
    scale = column_scale(v)  # [H, hd]
    assert scale.shape == (3, 8)
    mantissa, _ = torch.frexp(scale)
    assert (mantissa == 0.5).all()
    top = (v * scale).abs().amax(dim=0)  # [H, hd]
    nonzero = top != 0
    assert ((top[nonzero] >= 2**14) & (top[nonzero] < 2**15)).all() and nonzero.sum() == 23


def test_split_maths_take_the_split_attention_along(tiny_esm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """emulate_fp32 swaps an IEEE FP32 kernel for fp16x3 where it runs; "ieee" and other kernels stay."""
    import runner.kernels.fp16x3_attention as attention_module
    from runner.models.esm2 import load_esm2

    model = load_esm2(str(tiny_esm2_path))
    monkeypatch.setattr(attention_module, "fp16x3_attention_available", lambda device: True)
    monkeypatch.setattr(attention_module, "fp16x3_attention_problem", lambda device, head_dim: None)
    for math, before, after in [
        ("fp16x3", "nested", "fp16x3"),
        ("bf16x3", "flex", "fp16x3"),
        ("ieee", "nested", "nested"),  # --shadow-math ieee: IEEE attention too
        ("fp16x3", "exact", "exact"),  # the reference loop is never swapped
    ]:
        model.attention_backend = before
        model.emulate_fp32(math)
        assert model.attention_backend == after, (math, before)
    monkeypatch.setattr(attention_module, "fp16x3_attention_available", lambda device: False)
    model.attention_backend = "nested"
    model.emulate_fp32("fp16x3")
    assert model.attention_backend == "nested"  # no Triton or no GPU: the IEEE kernel stays


def test_available_only_on_cuda() -> None:
    assert not fp16x3_attention_available(torch.device("cpu"))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("heads", "head_dim", "alibi"), [(20, 64, False), (40, 64, False), (12, 64, True),
                                                          (8, 128, False)])
def test_gpu_kernel_is_fp32_accurate_at_model_shapes(heads: int, head_dim: int, alibi: bool) -> None:
    """ESM-2 650M (20 x 64), 3B (40 x 64), DNABERT-S (12 x 64, ALiBi) and 15B-wide heads (128)."""
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(2)
    lengths = torch.randint(30, 1023, (24,), generator=gen).tolist() + [1, 2, 1022]
    q, k, v, cu = _packed(lengths, heads, head_dim)
    slopes = alibi_slopes(heads) if alibi else None
    scale = head_dim**-0.5
    truth = _exact(q.double().to(device), k.double().to(device), v.double().to(device), cu, scale, slopes).cpu()
    args = (q.to(device), k.to(device), v.to(device), cu.to(device), max(lengths), scale)
    out = varlen_attention(*args, "fp16x3", alibi_slopes=slopes)
    ieee = varlen_attention(*args, "exact", alibi_slopes=slopes)
    err, ieee_err = _relative_error(out.cpu(), truth), _relative_error(ieee.cpu(), truth)
    print(f"\nfp16x3 attention {heads}x{head_dim} alibi={alibi}: max rel err vs fp64 {err:.2e} (IEEE FP32 {ieee_err:.2e})")
    assert err < 4e-6


@pytest.mark.gpu
@needs_cuda
def test_gpu_kernel_takes_more_sequences_than_a_grid_axis_of_65535() -> None:
    """Short reads in a big batch: 70,000 sequences of 1-3 tokens (CUDA grids stop at 65535 on axes 1 and 2)."""
    device = torch.device("cuda")
    lengths = [1, 2, 3] * 23_334  # 70,002 sequences, six tokens per repeat of the pattern
    q, k, v, cu = _packed(lengths, heads=2, head_dim=16)

    def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # [N, L, H, hd], float64
        p = (torch.einsum("nlhd,nmhd->nhlm", q, k) * 0.25).softmax(dim=-1)  # [N, H, L, L]
        return torch.einsum("nhlm,nmhd->nlhd", p, v)

    repeats = [t.double().reshape(-1, 6, 2, 16) for t in (q, k, v)]  # [N/3, 6, H, hd]
    truth = torch.cat([dense(*(t[:, a:b] for t in repeats)) for a, b in ((0, 1), (1, 3), (3, 6))], dim=1)
    truth = truth.reshape(q.shape)  # [T, H, hd]: the same sequences, batched by length
    out = fp16x3_attention(q.to(device), k.to(device), v.to(device), cu.to(device), 3, 0.25)
    assert _relative_error(out.cpu(), truth) < 4e-6


@pytest.mark.gpu
@needs_cuda
def test_gpu_shadow_model_runs_the_split_attention(tiny_esm2_path: Path) -> None:
    from runner.models.esm2 import load_esm2

    device = torch.device("cuda")
    model = load_esm2(str(tiny_esm2_path)).to(device).eval()
    model.select_attention(device)
    model.emulate_fp32("fp16x3")
    assert model.attention_backend == "fp16x3"


def test_a_kernel_that_fails_or_miscomputes_leaves_the_ieee_attention(
    tiny_esm2_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where Triton cannot compile (no C compiler, an old GPU) or the kernel computes wrong numbers, the shadow
    keeps its IEEE FP32 attention and says why, instead of failing or checking the job with a wrong reference."""
    import runner.kernels.fp16x3_attention as attention_module
    from runner.models.esm2 import load_esm2

    def broken(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    def wrong(q, k, v, cu, max_seqlen, scale, slopes=None, config=None):
        return _exact(q, k, v, cu, scale, slopes) * (1 + 1e-3)  # off by 0.1 %: FP16-sized, not FP32

    def right(q, k, v, cu, max_seqlen, scale, slopes=None, config=None):
        return _exact(q, k, v, cu, scale, slopes)

    monkeypatch.setattr(attention_module, "fp16x3_attention_available", lambda device: True)
    model = load_esm2(str(tiny_esm2_path))
    for kernel, expected in [(broken, "nested"), (wrong, "nested"), (right, "fp16x3")]:
        monkeypatch.setattr(attention_module, "fp16x3_attention", kernel)
        model.attention_backend = "nested"
        caplog.clear()
        with caplog.at_level("WARNING", logger="runner"):
            model.emulate_fp32("fp16x3")
        assert model.attention_backend == expected, kernel.__name__
        if expected == "nested":
            assert "fp16x3 attention unusable here" in caplog.text
    monkeypatch.setattr(attention_module, "fp16x3_attention", broken)
    assert attention_module.fp16x3_attention_problem(torch.device("cpu"), 16).startswith("RuntimeError: Failed to find C")
    monkeypatch.setattr(attention_module, "fp16x3_attention", wrong)
    assert "max relative error 1.0e-03" in attention_module.fp16x3_attention_problem(torch.device("cpu"), 16)
