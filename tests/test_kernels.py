"""Triton kernels against their plain-PyTorch references: outputs and every gradient.

Runs on CUDA when present; otherwise on CPU tensors through triton's interpreter
(TRITON_INTERPRET=1), which is why shapes are small. Sizes are deliberately odd (T=37, dim=200,
vocab=1000) so every kernel's partial-block masking is exercised.

Errors are measured as max|got - want| / max|want| ("relative max error"). A missing or zero
gradient scores 1.0 under it, far above every tolerance here (see test_tolerances_catch_a_zero_gradient).

Tolerances
  fp32: 1e-5. Kernels and references do the same fp32 math in a different order; observed errors
        are ~1e-7..1e-6.
  bf16: 3e-2 for every op. bf16 keeps 8 significant bits (a relative step of 2^-8 = 3.9e-3).
        The references round intermediates to bf16 where PyTorch's ops do (e.g. q*cos and
        rotate_half(q)*sin separately in rope, the bf16 matmul output of P in attention) while
        the kernels keep them in fp32 and round once, so the two legitimately differ by a few
        bf16 steps of the largest element; 3e-2 is ~8 steps (observed: up to ~1e-2).
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On CPU the kernels run through triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1
# before anything imports triton.
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("tests/test_kernels.py on CPU needs TRITON_INTERPRET=1 set before triton is imported "
                       "(tests/conftest.py does it; run the tests through pytest)")

pytest.importorskip("triton", reason="triton not installed (pip install -e .[triton]): Triton kernels untested")

import kernels  # noqa: E402

# `from kernels import swiglu` would give the dispatch function of that name: import the modules.
rmsnorm, rope, swiglu, cross_entropy, flash = (
    importlib.import_module(f"kernels.{name}")
    for name in ("rmsnorm", "rope", "swiglu", "cross_entropy", "flash_attention"))

from model.config import preset  # noqa: E402
from model.llama import Llama  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
IGNORE = kernels.IGNORE_INDEX  # the no-loss target
DTYPES = [torch.float32, torch.bfloat16]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| / max|want|, in fp32."""
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def randn(*shape, dtype=torch.float32, gen=None, scale=1.0):
    return (torch.randn(tuple(shape), generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def run_both(ref_fn, tri_fn, inputs, seed=0):
    """Forward and backward through both implementations with the same random upstream grads.

    inputs: tensors; floating ones get requires_grad. Returns (outs_ref, outs_tri, grads_ref,
    grads_tri) with grads listed for the floating inputs, in order.
    """
    ref_in = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    tri_in = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out_ref, out_tri = ref_fn(*ref_in), tri_fn(*tri_in)
    out_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    out_tri = out_tri if isinstance(out_tri, tuple) else (out_tri,)
    gen = torch.Generator().manual_seed(seed + 1000)
    upstream = [randn(*o.shape, dtype=o.dtype, gen=gen) for o in out_ref]
    torch.autograd.backward(out_ref, upstream)
    torch.autograd.backward(out_tri, upstream)
    grads_ref = [x.grad for x in ref_in if x.is_floating_point()]
    grads_tri = [x.grad for x in tri_in if x.is_floating_point()]
    return out_ref, out_tri, grads_ref, grads_tri


def assert_close_all(out_ref, out_tri, grads_ref, grads_tri, tol, names):
    for i, (a, b) in enumerate(zip(out_tri, out_ref)):
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape, a.dtype, b.dtype)
        assert rel_err(a, b) < tol, f"output {i}: rel err {rel_err(a, b):.2e} >= {tol}"
    assert len(grads_tri) == len(names)
    for name, a, b in zip(names, grads_tri, grads_ref):
        assert a is not None, f"no gradient for {name}"
        assert b.abs().max() > 1e-3, f"reference gradient of {name} is ~0: the test would prove nothing"
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        assert rel_err(a, b) < tol, f"grad {name}: rel err {rel_err(a, b):.2e} >= {tol}"


def test_tolerances_catch_a_zero_gradient():
    """The error measure gives a dropped (all-zero) gradient 1.0, which no tolerance accepts."""
    g = randn(37, 200)
    assert rel_err(torch.zeros_like(g), g) == 1.0 > max(TOL.values())
    assert rel_err(0.5 * g, g) > max(TOL.values())  # a gradient off by a factor fails too


# ---- dispatch ------------------------------------------------------------------------------

@pytest.fixture
def backend():
    """Yields kernels.set_backend and restores the backend afterwards."""
    before = kernels.get_backend()
    yield kernels.set_backend
    kernels.set_backend(before)


def test_dispatch_picks_backend(backend):
    x, w = randn(3, 200), randn(200)
    backend("triton")
    assert type(kernels.rms_norm(x, w.requires_grad_(), 1e-6).grad_fn).__name__ == "RMSNormFunctionBackward"
    backend("torch")
    assert type(kernels.rms_norm(x, w, 1e-6).grad_fn).__name__ != "RMSNormFunctionBackward"
    backend("auto")  # Triton exactly where the tensor is on CUDA
    is_triton = type(kernels.rms_norm(x, w, 1e-6).grad_fn).__name__ == "RMSNormFunctionBackward"
    assert is_triton == x.is_cuda


def test_dispatch_reads_env_var():
    """LANGSHIFT_KERNELS is read at import, so check it in a fresh interpreter."""
    import subprocess
    code = ("import os, torch, kernels; x = torch.randn(2, 8); w = torch.randn(8, requires_grad=True); "
            "print(kernels.get_backend(), type(kernels.rms_norm(x, w, 1e-6).grad_fn).__name__)")
    env = dict(os.environ, LANGSHIFT_KERNELS="triton", TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["triton", "RMSNormFunctionBackward"]


def test_dispatch_refuses_instead_of_falling_back(backend, monkeypatch):
    with pytest.raises(ValueError, match="unknown"):
        backend("cuda")
    if DEVICE == "cpu":
        backend("triton")
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            kernels.swiglu(randn(4, 8), randn(4, 8))


# ---- RMSNorm -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm(dtype):
    gen = torch.Generator().manual_seed(0)
    x = randn(2, 37, 200, dtype=dtype, gen=gen)
    w = 1.0 + 0.5 * randn(200, dtype=dtype, gen=gen)
    results = run_both(lambda x, w: rmsnorm.rms_norm_reference(x, w, 1e-6),
                       lambda x, w: rmsnorm.rms_norm_triton(x, w, 1e-6), [x, w])
    assert_close_all(*results, TOL[dtype], ["x", "weight"])


def test_shapes_without_a_checked_gpu_config_are_refused():
    """Widths past what tests/test_kernels_compile.py checks fail in one line instead of spilling."""
    with pytest.raises(ValueError, match="rms_norm: rows of 8200 > 8192"):
        rmsnorm.rms_norm_triton(randn(2, 8200), randn(8200), 1e-6)
    q = randn(1, 2, 4, 192)
    with pytest.raises(ValueError, match="head dim 192 > 128"):
        flash.flash_attention_triton(q, q, q)


def test_rmsnorm_non_contiguous_input():
    gen = torch.Generator().manual_seed(1)
    x = randn(200, 37, gen=gen).t()  # [37, 200] with stride (1, 37)
    w = randn(200, gen=gen)
    results = run_both(lambda x, w: rmsnorm.rms_norm_reference(x, w, 1e-5),
                       lambda x, w: rmsnorm.rms_norm_triton(x, w, 1e-5), [x, w])
    assert_close_all(*results, TOL[torch.float32], ["x", "weight"])


# ---- RoPE ----------------------------------------------------------------------------------

def rope_tables(B, T, hd, per_batch: bool):
    """Real rotary tables: cos/sin of position * theta^(-2i/hd), rotate-half layout."""
    inv_freq = 10000.0 ** (-torch.arange(0, hd, 2).float() / hd)
    pos = torch.arange(T).float()[None].expand(B, T) + (torch.arange(B)[:, None] * 3 if per_batch else 0)
    angles = pos[..., None] * inv_freq
    angles = torch.cat((angles, angles), -1).to(DEVICE)
    cos, sin = angles.cos(), angles.sin()
    return (cos, sin) if per_batch else (cos[0], sin[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_batch", [True, False], ids=["cos_BThd", "cos_Thd"])
def test_rope(dtype, per_batch):
    gen = torch.Generator().manual_seed(2)
    q, k = randn(2, 4, 37, 64, dtype=dtype, gen=gen), randn(2, 2, 37, 64, dtype=dtype, gen=gen)
    cos, sin = rope_tables(2, 37, 64, per_batch)
    cos, sin = cos.to(dtype), sin.to(dtype)
    q0, k0 = q.clone(), k.clone()
    results = run_both(lambda q, k: rope.apply_rope_reference(q, k, cos, sin),
                       lambda q, k: rope.apply_rope_triton(q, k, cos, sin), [q, k])
    assert_close_all(*results, TOL[dtype], ["q", "k"])
    assert torch.equal(q, q0) and torch.equal(k, k0), "rope modified its inputs"


def test_rope_on_model_layout():
    """q/k as the model makes them: a [B,T,H,hd] projection viewed as [B,H,T,hd] (non-contiguous)."""
    gen = torch.Generator().manual_seed(3)
    q = randn(2, 37, 4, 64, gen=gen).transpose(1, 2)
    k = randn(2, 37, 2, 64, gen=gen).transpose(1, 2)
    cos, sin = rope_tables(2, 37, 64, per_batch=True)
    results = run_both(lambda q, k: rope.apply_rope_reference(q, k, cos, sin),
                       lambda q, k: rope.apply_rope_triton(q, k, cos, sin), [q, k])
    assert_close_all(*results, TOL[torch.float32], ["q", "k"])


# ---- SwiGLU --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    gen = torch.Generator().manual_seed(4)
    gate, up = randn(3, 37, 200, dtype=dtype, gen=gen), randn(3, 37, 200, dtype=dtype, gen=gen)
    results = run_both(swiglu.swiglu_reference, swiglu.swiglu_triton, [gate, up])
    assert_close_all(*results, TOL[dtype], ["gate", "up"])


# ---- fused linear + cross-entropy ----------------------------------------------------------

def ce_inputs(dtype, N=37, D=48, V=1000, seed=5):
    gen = torch.Generator().manual_seed(seed)
    hidden = randn(N, D, dtype=dtype, gen=gen)
    weight = randn(V, D, dtype=dtype, gen=gen, scale=0.3)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.randperm(N, generator=gen)[: N // 4]] = IGNORE  # prompt tokens, padding
    return hidden, weight, targets.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [16, 0], ids=["chunk16", "unchunked"])
def test_linear_cross_entropy_triton(dtype, chunk_size):
    hidden, weight, targets = ce_inputs(dtype)
    # The materialised reference is the definition; block_v=256 makes the kernel loop over
    # four vocab blocks, the last one partial (1000 = 3*256 + 232).
    results = run_both(lambda h, w: cross_entropy.linear_cross_entropy_reference(h, w, targets, IGNORE, 0),
                       lambda h, w: cross_entropy.linear_cross_entropy_triton(h, w, targets, IGNORE, chunk_size,
                                                                              block_v=256),
                       [hidden, weight])
    assert results[1][0].dtype == torch.float32
    assert_close_all(*results, TOL[dtype], ["hidden", "weight"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_chunked_reference(dtype):
    """The chunked plain-PyTorch path (gradients computed in forward) equals the autograd definition."""
    hidden, weight, targets = ce_inputs(dtype, seed=6)
    results = run_both(lambda h, w: cross_entropy.linear_cross_entropy_reference(h, w, targets, IGNORE, 0),
                       lambda h, w: cross_entropy.linear_cross_entropy_reference(h, w, targets, IGNORE, 10),
                       [hidden, weight])
    assert "LinearCrossEntropyFunction" in type(results[1][0].grad_fn).__name__  # not the autograd definition
    assert_close_all(*results, TOL[dtype], ["hidden", "weight"])


def test_linear_cross_entropy_ignore_and_mean():
    """Mean over loss tokens only; ignored rows get exactly zero gradient; all-ignored gives 0."""
    assert IGNORE == -100  # PyTorch's (F.cross_entropy) and transformers' label convention
    hidden, weight, targets = ce_inputs(torch.float32, seed=7)
    h = hidden.clone().requires_grad_()
    loss = cross_entropy.linear_cross_entropy_triton(h, weight, targets, IGNORE, 16)
    loss.backward()
    keep = targets != IGNORE
    want = torch.nn.functional.cross_entropy(hidden[keep] @ weight.t(), targets[keep])
    assert abs(loss.item() - want.item()) < 1e-5 * want.item()
    assert torch.all(h.grad[~keep] == 0) and torch.all(h.grad[keep].abs().sum(-1) > 0)
    none = torch.full_like(targets, IGNORE)
    h2 = hidden.clone().requires_grad_()
    loss = cross_entropy.linear_cross_entropy_triton(h2, weight, none, IGNORE, 16)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h2.grad == 0)


# ---- flash attention -----------------------------------------------------------------------

def attn_inputs(dtype, B, H, HKV, T, S, hd, seed):
    gen = torch.Generator().manual_seed(seed)
    return (randn(B, H, T, hd, dtype=dtype, gen=gen), randn(B, HKV, S, hd, dtype=dtype, gen=gen),
            randn(B, HKV, S, hd, dtype=dtype, gen=gen))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd", [64, 128])
def test_flash_attention_causal_gqa(dtype, hd):
    # T=37 with 16-wide tiles: the last query and key blocks are partial.
    q, k, v = attn_inputs(dtype, B=1, H=4, HKV=2, T=37, S=37, hd=hd, seed=8)
    results = run_both(lambda q, k, v: flash.attention_reference(q, k, v, causal=True),
                       lambda q, k, v: flash.flash_attention_triton(q, k, v, causal=True, block_m=16, block_n=16),
                       [q, k, v])
    assert_close_all(*results, TOL[dtype], ["q", "k", "v"])


@pytest.mark.parametrize("case", [
    dict(T=37, S=37, causal=True, block_m=32, block_n=16),   # unequal tiles
    dict(T=37, S=37, causal=False, block_m=16, block_n=16),
    dict(T=5, S=37, causal=True, block_m=16, block_n=16),    # queries at the end of a cache
    dict(T=20, S=37, causal=False, block_m=16, block_n=32),
], ids=["causal_unequal_tiles", "full", "causal_T<S", "full_T<S"])
def test_flash_attention_shapes(case):
    q, k, v = attn_inputs(torch.float32, B=2, H=6, HKV=2, T=case["T"], S=case["S"], hd=64, seed=9)
    results = run_both(lambda q, k, v: flash.attention_reference(q, k, v, causal=case["causal"]),
                       lambda q, k, v: flash.flash_attention_triton(q, k, v, causal=case["causal"],
                                                                    block_m=case["block_m"],
                                                                    block_n=case["block_n"]),
                       [q, k, v])
    assert_close_all(*results, TOL[torch.float32], ["q", "k", "v"])


def test_flash_attention_gqa_accumulates_dk_dv_over_the_group():
    """With one k/v head shared by 4 q heads, dk/dv are the sums of what the 4 heads would give
    each on its own copy of k/v (what the reference gets from repeat_interleave's backward)."""
    q, k, v = attn_inputs(torch.float32, B=1, H=4, HKV=1, T=37, S=37, hd=64, seed=10)
    shared = [k.clone().requires_grad_(), v.clone().requires_grad_()]
    copies = [k.repeat_interleave(4, 1).requires_grad_(), v.repeat_interleave(4, 1).requires_grad_()]
    do = randn(*q.shape, gen=torch.Generator().manual_seed(11))
    flash.flash_attention_triton(q, *shared, block_m=16, block_n=16).backward(do)
    flash.flash_attention_triton(q, *copies, block_m=16, block_n=16).backward(do)
    for one, four in zip(shared, copies):
        per_head = four.grad.view(1, 4, 37, 64)
        assert rel_err(one.grad, per_head.sum(1, keepdim=True)) < TOL[torch.float32]
        # The heads disagree, so keeping only one of them (no accumulation) would fail above.
        assert rel_err(per_head[:, :1], per_head.sum(1, keepdim=True)) > 0.1


def test_flash_attention_leaves_inputs_alone():
    q, k, v = attn_inputs(torch.float32, B=1, H=2, HKV=2, T=19, S=19, hd=64, seed=12)
    before = [t.clone() for t in (q, k, v)]
    flash.flash_attention_triton(*(t.requires_grad_() for t in (q, k, v))).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), before))


# ---- a whole training step -----------------------------------------------------------------

def training_step(attention: str, kernel_backend: str, state: dict, tokens: torch.Tensor):
    """One SGD step of the tiny model; returns (loss, {name: grad}, {name: updated param})."""
    kernels.set_backend(kernel_backend)
    model = Llama(preset("tiny", attention=attention)).to(DEVICE)
    model.load_state_dict(state)
    hidden = model(tokens, return_hidden=True)                  # [B, T, D]
    targets = tokens[:, 1:].clone()
    targets[0, :7] = IGNORE                                     # a prompt without loss
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    loss = kernels.linear_cross_entropy(hidden, model.lm_head.weight, targets.reshape(-1), chunk_size=16)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    return loss.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_training_step_all_kernels_on_equals_all_off(backend):
    model = Llama(preset("tiny")).init_weights(std=0.1, seed=0)
    gen = torch.Generator().manual_seed(13)
    with torch.no_grad():  # norm weights away from 1 so their gradients matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    state = {n: t.to(DEVICE) for n, t in model.state_dict().items()}
    tokens = torch.randint(0, 256, (2, 38), generator=gen).to(DEVICE)  # 37 predicted positions
    loss_off, grads_off, params_off = training_step("eager", "torch", state, tokens)
    loss_on, grads_on, params_on = training_step("triton", "triton", state, tokens)
    assert abs(loss_on.item() - loss_off.item()) < 1e-5 * loss_off.item()
    assert grads_on.keys() == grads_off.keys() and len(grads_on) == 2 * 9 + 3
    for name in grads_off:
        assert grads_off[name].abs().max() > 1e-6, f"{name}: reference gradient is ~0"
        err = rel_err(grads_on[name], grads_off[name])
        assert err < TOL[torch.float32], f"{name}: gradient rel err {err:.2e}"  # observed <= 1.5e-6
        assert rel_err(params_on[name], params_off[name]) < TOL[torch.float32], name


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_torch_path_is_the_reference_bit_for_bit_and_keeps_only_its_inputs(dtype):
    # The CPU path of kernels.swiglu: same forward and gradients as autograd through
    # swiglu_reference (the very same ops), with gate and up kept instead of gate, silu(gate), up.
    gen = torch.Generator().manual_seed(4)
    gate, up = randn(3, 37, 200, dtype=dtype, gen=gen), randn(3, 37, 200, dtype=dtype, gen=gen)
    out_ref, out_new, grads_ref, grads_new = run_both(swiglu.swiglu_reference, swiglu.swiglu_torch, [gate, up])
    assert torch.equal(out_new[0], out_ref[0])
    for a, b in zip(grads_new, grads_ref):
        assert torch.equal(a, b)

    def saved_bytes(fn):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        kept = {}

        def keep(t):  # bytes of each distinct storage autograd keeps for backward
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            fn(g, u)
        return sum(kept.values())
    size = gate.numel() * gate.element_size()
    assert saved_bytes(swiglu.swiglu_reference) == 3 * size
    assert saved_bytes(swiglu.swiglu_torch) == 2 * size
    with torch.no_grad():
        assert torch.equal(swiglu.swiglu_torch(gate, up), swiglu.swiglu_reference(gate, up))
