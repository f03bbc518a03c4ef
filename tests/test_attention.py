"""kernels.attention with packed documents and key padding: every path against the eager reference.

The reference is kernels.attention_reference (softmax written out, fp32) with a dense bool mask
built here from the segment ids the way the definition reads: same id, and (if causal) not a
later key; key_mask removes padded keys. The paths under test:
  triton  the flash kernel (forward + three backward kernels) through TRITON_INTERPRET=1 on CPU,
          16x16 tiles, so T=37 leaves partial blocks and documents straddle block edges;
  sdpa    F.scaled_dot_product_attention with the dense mask (the CPU torch path with key_mask);
  torch   kernels.attention_torch: on CPU one unmasked SDPA per document for packed rows (the
          training path), SDPA without a mask for one-document rows, the dense mask with key_mask;
  flex    FlexAttention's document block mask, run eagerly (forward only: torch 2.13 has no
          FlexAttention backward on CPU; on CUDA the same mask function runs compiled).
Segments are made like data/packing.py makes them: increasing ids, one contiguous run each.

Tolerances (relative max error, max|got - want| / max|want|, as in tests/test_kernels.py):
  fp32 1e-5: the same fp32 math in another order (observed ~1e-7..1e-6);
  bf16 3e-2: the reference rounds the bf16 scores and P to bf16 where PyTorch's matmuls do,
       the kernels keep fp32 and round once: a few bf16 steps (2^-8 = 3.9e-3) of the largest
       element, observed up to ~1e-2.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import kernels
from tests.test_kernels import DEVICE, TOL, assert_close_all, randn, rel_err, run_both

flash = importlib.import_module("kernels.flash_attention")
torch_path = importlib.import_module("kernels.torch_attention")


def packed_segments(B: int, T: int, max_len: int, seed: int) -> torch.Tensor:
    """[B,T] int64 ids 0,0,..,1,1,..: documents of random length 1..max_len, back to back."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        lengths = torch.randint(1, max_len + 1, (T,), generator=gen)
        rows.append(torch.repeat_interleave(torch.arange(T), lengths)[:T])
    return torch.stack(rows).to(DEVICE)


def reference_mask(B, T, S, causal, segments, key_mask) -> torch.Tensor:
    """Bool [B,1,T,S] from the definition (independent of kernels/torch_attention.py's run bounds)."""
    allowed = torch.ones(B, 1, T, S, dtype=torch.bool, device=DEVICE)
    if causal:
        allowed &= torch.ones(T, S, dtype=torch.bool, device=DEVICE).tril(diagonal=S - T)
    if segments is not None:
        allowed &= (segments[:, :, None] == segments[:, None, :])[:, None]
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    return allowed


def left_padding(B, S, pads) -> torch.Tensor:
    """key_mask [B,S]: False for the first pads[b] positions of row b."""
    return (torch.arange(S)[None] >= torch.tensor(pads)[:, None]).to(DEVICE)


def right_padded_docs(B, T, seed):
    """Packed documents with the tail of row 0 padding (its own segment, keys masked): the padded
    queries see no key at all, the case where a row's output must be zeros."""
    segments = packed_segments(B, T, 9, seed)
    key_mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    key_mask[0, T - 5:] = False
    segments[0, T - 5:] = segments[0, T - 6] + 1
    return segments, key_mask


CASES = {
    # name: (B, H, K, T, S, causal, segments, key_mask)
    "gqa_docs": lambda: (2, 4, 2, 37, 37, True, packed_segments(2, 37, 20, 1), None),
    "one_doc": lambda: (2, 4, 2, 37, 37, True, torch.full((2, 37), 3, device=DEVICE), None),
    "tiny_docs": lambda: (2, 4, 1, 37, 37, True, packed_segments(2, 37, 3, 2), None),
    "docs_noncausal": lambda: (1, 2, 2, 37, 37, False, packed_segments(1, 37, 12, 3), None),
    "docs_key_padding": lambda: (2, 4, 2, 37, 37, True, *right_padded_docs(2, 37, 4)),
    "left_padded_prefill": lambda: (2, 4, 2, 37, 37, True, None, left_padding(2, 37, [0, 7])),
    "decode_with_cache": lambda: (2, 4, 2, 3, 37, True, None, left_padding(2, 37, [4, 20])),
}

PATHS = {
    "triton": lambda q, k, v, seg, km, causal: flash.flash_attention_triton(
        q, k, v, causal=causal, segments=seg, key_mask=km, block_m=16, block_n=16),
    "sdpa": lambda q, k, v, seg, km, causal: torch_path.sdpa_attention(q, k, v, seg, km, causal),
    "torch": lambda q, k, v, seg, km, causal: torch_path.attention_torch(q, k, v, seg, km, causal),
}


def case_inputs(name, dtype, hd=32, seed=0):
    B, H, K, T, S, causal, segments, key_mask = CASES[name]()
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (randn(B, H, T, hd, dtype=dtype, gen=gen), randn(B, K, S, hd, dtype=dtype, gen=gen),
               randn(B, K, S, hd, dtype=dtype, gen=gen))
    mask = reference_mask(B, T, S, causal, segments, key_mask)
    return (q, k, v), causal, segments, key_mask, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", list(PATHS))
def test_attention_path_equals_reference(path, case, dtype):
    (q, k, v), causal, segments, key_mask, mask = case_inputs(case, dtype)
    results = run_both(lambda q, k, v: kernels.attention_reference(q, k, v, causal=causal, mask=mask),
                       lambda q, k, v: PATHS[path](q, k, v, segments, key_mask, causal), [q, k, v])
    assert_close_all(*results, TOL[dtype], ["q", "k", "v"])
    empty = ~mask.any(-1)  # [B,1,T] queries with no visible key
    if empty.any():
        out, (dq, *_) = results[1][0], results[3]
        rows = empty.expand(-1, q.shape[1], -1)
        assert torch.all(out[rows] == 0) and torch.all(dq[rows] == 0), "a query without keys must give zeros"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c]()[6] is not None])
def test_flex_attention_mask_equals_reference(case):
    """The FlexAttention block mask (the CUDA torch path) in an eager forward on CPU."""
    (q, k, v), causal, segments, key_mask, mask = case_inputs(case, torch.float32)
    want = kernels.attention_reference(q, k, v, causal=causal, mask=mask)
    got = torch_path.flex_attention(q, k, v, segments, key_mask, causal, compiled=False)
    assert rel_err(got, want) < TOL[torch.float32]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_cache_follows_the_tensors():
    """The block mask cached for one forward pass is not reused for other segments: not for a new
    tensor (which may get a freed tensor's id), not after an in-place change."""
    (q, k, v), *_ = case_inputs("gqa_docs", torch.float32)
    choices = [packed_segments(2, 37, 9, seed) for seed in range(10, 14)]
    for choice in choices:  # a fresh tensor each time, the previous one freed: CPython reuses its id
        segments = choice.clone()
        want = kernels.attention_reference(q, k, v, mask=reference_mask(2, 37, 37, True, segments, None))
        assert rel_err(torch_path.flex_attention(q, k, v, segments, compiled=False), want) < TOL[torch.float32]
        del segments
    segments = packed_segments(2, 37, 9, 20)
    torch_path.flex_attention(q, k, v, segments, compiled=False)
    segments.copy_(packed_segments(2, 37, 5, 21))  # in place: same tensor, new version
    want = kernels.attention_reference(q, k, v, mask=reference_mask(2, 37, 37, True, segments, None))
    assert rel_err(torch_path.flex_attention(q, k, v, segments, compiled=False), want) < TOL[torch.float32]


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # document A's own rows, in the interpreter
def test_triton_skips_key_blocks_of_other_documents():
    """Poison document A (NaN in its k, v, q and upstream gradient) and check document B's
    outputs and gradients stay finite and right: a loaded block of A would spread NaN through
    P @ V (0 * NaN) even though the mask removes its scores. Documents sit on 16-token tile edges."""
    T, hd = 64, 32
    segments = torch.tensor([[0] * 32 + [1] * 32], device=DEVICE)
    q, k, v = (randn(1, 2, T, hd, gen=torch.Generator().manual_seed(s)) for s in (5, 6, 7))
    do = randn(1, 2, T, hd, gen=torch.Generator().manual_seed(8))
    for t in (q, k, v, do):
        t[:, :, :32] = float("nan")
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash.flash_attention_triton(*inputs, causal=True, segments=segments, block_m=16, block_n=16)
    out.backward(do)
    alone = [t[:, :, 32:].clone().requires_grad_() for t in (q, k, v)]  # document B on its own
    want = kernels.attention_reference(*alone, causal=True)
    want.backward(do[:, :, 32:])
    assert rel_err(out[:, :, 32:], want) < TOL[torch.float32]
    for name, got, ref in zip("qkv", inputs, alone):
        assert torch.isfinite(got.grad[:, :, 32:]).all(), f"d{name} of document B saw document A"
        assert rel_err(got.grad[:, :, 32:], ref.grad) < TOL[torch.float32], name


def test_document_bounds_are_runs():
    """Each token's [lo, hi) is its run of equal ids; an id repeated after another run is a new document."""
    segments = torch.tensor([[0, 0, 1, 1, 1, 2], [4, 4, 4, 4, 4, 4], [0, 1, 1, 0, 0, 0]])
    lo, hi = torch_path.document_bounds(segments)
    assert lo.tolist() == [[0, 0, 2, 2, 2, 5], [0] * 6, [0, 1, 1, 3, 3, 3]]
    assert hi.tolist() == [[2, 2, 5, 5, 5, 6], [6] * 6, [1, 3, 3, 6, 6, 6]]


def test_document_lengths_are_runs():
    segments = torch.tensor([[0, 0, 1, 1, 1, 2], [4, 4, 4, 4, 4, 4], [0, 1, 1, 0, 0, 0]])
    assert torch_path.document_lengths(segments) == [[2, 3, 1], [6], [1, 2, 3]]


def test_document_attention_compiles_once():
    """Inside a compiled block the per-document loop runs eagerly (compiler.disable): new document
    lengths give the reference's numbers without a recompile."""
    (q, k, v), *_ = case_inputs("gqa_docs", torch.float32)
    compiled = torch.compile(lambda q, k, v, seg: torch_path.attention_torch(q, k, v, seg) * 2, backend="eager")
    for i, seed in enumerate((30, 31, 32)):
        segments = packed_segments(2, 37, 9, seed)
        want = kernels.attention_reference(q, k, v, mask=reference_mask(2, 37, 37, True, segments, None)) * 2
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = compiled(q, k, v, segments)
        assert rel_err(got, want) < TOL[torch.float32]


@pytest.fixture
def backend():
    before = kernels.get_backend()
    yield kernels.set_backend
    kernels.set_backend(before)


def test_dispatch_picks_the_path(backend, monkeypatch):
    """kernels.attention: Triton when forced (or on CUDA under auto), else the torch path: on CPU
    one SDPA per document, and plain SDPA (no segments at all) for one-document rows; on CUDA
    FlexAttention."""
    (q, k, v), causal, segments, key_mask, _ = case_inputs("gqa_docs", torch.float32)
    backend("triton")
    out = kernels.attention(q.requires_grad_(), k, v, segments=segments)
    assert type(out.grad_fn).__name__ == "FlashAttentionFunctionBackward"
    calls = []
    for name in ("sdpa_attention", "flex_attention", "document_attention", "_sdpa_causal_or_not"):
        real = getattr(torch_path, name)
        monkeypatch.setattr(torch_path, name, lambda *a, _n=name, _f=real: calls.append((_n, a)) or _f(*a))
    backend("auto" if DEVICE == "cpu" else "torch")
    kernels.attention(q, k, v, segments=segments)
    kernels.attention(q, k, v, segments=torch.zeros_like(segments))
    names = [name for name, _ in calls]
    if DEVICE == "cpu":  # one unmasked SDPA per document; one for the whole batch of one-document rows
        n_docs = sum(len(row) for row in torch_path.document_lengths(segments))
        assert names == ["document_attention"] + ["_sdpa_causal_or_not"] * n_docs + ["document_attention",
                                                                                     "_sdpa_causal_or_not"]
        assert calls[0][1][3] is segments and calls[-1][1][0].shape == q.shape
    else:
        assert names == ["flex_attention", "flex_attention"]


@pytest.mark.skipif(DEVICE != "cpu", reason="the fp32 detour for short documents is CPU-only")
def test_short_bf16_documents_run_in_fp32_under_autocast():
    """bf16 documents under CPU_FP32_BELOW tokens are attended in fp32 also inside bf16 autocast
    (the training path): CPU autocast lists SDPA among its bf16 ops and would cast the fp32
    inputs back (inside the dispatcher, so only the numbers show it), so the detour must switch
    autocast off. Same numbers as without autocast, bit for bit."""
    (q, k, v), causal, segments, *_ = case_inputs("gqa_docs", torch.bfloat16)
    plain = torch_path.document_attention(q, k, v, segments, causal)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = torch_path.document_attention(q, k, v, segments, causal)
        # the detour's premise: autocast does cast SDPA's fp32 inputs to bf16
        assert torch_path.F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                         enable_gqa=True).dtype == torch.bfloat16
    assert under.dtype == torch.bfloat16 and torch.equal(under, plain)


@pytest.mark.skipif(DEVICE != "cpu", reason="the fp32 detour for short documents is CPU-only")
def test_a_block_of_short_bf16_documents_is_cast_once_with_the_same_numbers():
    """When every document of a bf16 block takes the fp32 detour, q, k, v are cast once for the
    block and the output once back (4 casts forward, whatever the number of documents), and
    output and gradients equal the per-document detour's bit for bit (a cast is elementwise)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    (q, k, v), causal, segments, *_ = case_inputs("gqa_docs", torch.bfloat16)
    lengths = torch_path.document_lengths(segments)
    assert sum(map(len, lengths)) > 4 and max(map(max, lengths)) < torch_path.CPU_FP32_BELOW

    class Casts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Casts.count += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with Casts():
        block = torch_path.document_attention(*leaves, segments, causal)
    assert Casts.count == 4
    per_doc = [t.clone().requires_grad_() for t in (q, k, v)]  # each document cast on its own
    reference = torch_path._per_document(*per_doc, lengths, causal)
    assert block.dtype == torch.bfloat16 and torch.equal(block, reference)
    grad = randn(*block.shape, dtype=torch.bfloat16, gen=torch.Generator().manual_seed(1))
    block.backward(grad)
    reference.backward(grad)
    for name, a, b in zip("qkv", leaves, per_doc):
        assert torch.equal(a.grad, b.grad), f"d{name} differs"


def test_bad_masks_are_refused():
    (q, k, v), *_ = case_inputs("decode_with_cache", torch.float32)
    with pytest.raises(ValueError, match="segments .* need T == S"):
        kernels.attention(q, k, v, segments=torch.zeros(2, 3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"key_mask must be bool \[B=2, S=37\]"):
        kernels.attention(q, k, v, key_mask=torch.ones(2, 3, dtype=torch.bool, device=DEVICE))
