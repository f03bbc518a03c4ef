"""LoRA layer: merge exactness, PEFT as oracle for the saved adapter, gradient isolation."""
from __future__ import annotations

import math

import pytest
import torch

from model.checkpoint import load, save
from model.config import preset
from model.llama import Llama
import model.lora as lora
from model.lora import (ALL_LINEAR, LoRAConfig, LoRALinear, LoRAUpdate, apply_lora, dropout_drops, keep_mask,
                        load_adapter, lora_modules, lora_update_reference, merge_lora, save_adapter)
from tests.conftest import need_module


def lora_model(seed=0, **kw):
    """-> (tiny Llama with a nonzero LoRA on every linear layer, in eval mode; its LoRAConfig)."""
    config = preset("tiny", vocab_size=300)
    model = Llama(config).init_weights(seed=seed)
    lora = apply_lora(model, r=4, alpha=8, dropout=0.0, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B starts at zero; give it values so the update is visible
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model.eval(), lora


def tokens(n=2, t=16):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(9))


def test_fresh_lora_is_the_base_model():
    config = preset("tiny", vocab_size=300)
    base = Llama(config).init_weights(seed=0).eval()
    with torch.no_grad():
        expected = base(tokens())
        apply_lora(base, r=4, alpha=8)
        assert torch.equal(base(tokens()), expected)  # B = 0


def test_lora_changes_output_and_merge_is_exact():
    model, _ = lora_model()
    with torch.no_grad():
        unmerged = model(tokens())
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.merge()
        merged = model(tokens())
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.unmerge()
        again = model(tokens())
    assert (merged - unmerged).abs().max() < 1e-5
    assert (again - unmerged).abs().max() < 1e-5
    plain = Llama(model.config).init_weights(seed=0).eval()
    with torch.no_grad():
        assert (plain(tokens()) - unmerged).abs().max() > 1e-2  # the adapter is not a no-op


def test_only_lora_and_chosen_modules_train_and_frozen_weights_stay_bit_identical():
    model = lora_model(trainable_modules=["lm_head"])[0].train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n} | {"lm_head.weight"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(tokens()).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n


def test_peft_loads_our_adapter_with_the_same_logits(tmp_path):
    transformers, peft = need_module("transformers"), need_module("peft")
    model, lora = lora_model(trainable_modules=["lm_head"])
    with torch.no_grad():  # a trained head: must travel in the adapter (PEFT modules_to_save)
        model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape) * 0.05)
    save_adapter(model, lora, tmp_path / "adapter")
    # the base weights, as transformers sees them
    base = Llama(model.config).init_weights(seed=0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf()))
    hf.load_state_dict(base.state_dict(), strict=False)
    peft_model = peft.PeftModel.from_pretrained(hf.eval(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (peft_model(tokens()).logits - model(tokens())).abs().max() < 1e-4


def tiny_qwen2(folder):
    """A random transformers Qwen2 (q/k/v bias, tied head) saved by save_pretrained, and the same
    checkpoint loaded by us with a nonzero LoRA on every linear layer (and its LoRAConfig)."""
    transformers = need_module("transformers")
    config = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, vocab_size=300,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # transformers inits biases at zero; make them count
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(folder)
    model, _ = load(folder, tokenizer=False)
    lora = apply_lora(model, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return hf, model.eval(), lora


def test_qwen2_lora_keeps_the_bias_frozen_and_peft_gives_the_same_logits(tmp_path):
    transformers, peft = need_module("transformers"), need_module("peft")
    hf, model, lora = tiny_qwen2(tmp_path / "base")
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    assert len(biases) == 3 * 2 and not any(p.requires_grad for p in biases.values())  # q/k/v of 2 layers
    save_adapter(model, lora, tmp_path / "adapter")
    with torch.no_grad():
        ours, base = model(tokens()), hf(tokens()).logits
        assert (base - ours).abs().max() > 1e-2  # the adapter is not a no-op
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()  # wraps hf in place
        assert (peft_model(tokens()).logits - ours).abs().max() < 1e-4
    # merged and saved: a plain Qwen2 checkpoint that transformers loads with the same logits
    merged = save(merge_lora(model), None, tmp_path / "merged")
    again = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(again).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        assert (again(tokens()).logits - ours).abs().max() < 1e-4


def test_lora_on_a_biased_linear_trains_only_a_and_b(tmp_path):
    base = torch.nn.Linear(12, 7, bias=True)
    with torch.no_grad():
        base.bias.normal_()
    bias = base.bias.detach().clone()
    layer = LoRALinear(base, r=3, alpha=6)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 12)
    expected = x @ layer.weight.t() + bias + lora_update_reference(x, layer.lora_A, layer.lora_B, None, 2.0, 0.0)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    layer(x).sum().backward()
    assert layer.bias.grad is None and layer.lora_A.grad is not None
    layer.merge()
    assert torch.equal(layer.bias, bias) and torch.allclose(layer(x), expected, atol=1e-5)


def test_adapter_round_trip_and_merged_plain_model(tmp_path):
    model, lora = lora_model(trainable_modules=["lm_head"])
    save_adapter(model, lora, tmp_path / "adapter")
    fresh = Llama(model.config).init_weights(seed=0)
    assert load_adapter(fresh, tmp_path / "adapter") == lora  # the config travels in adapter_config.json
    fresh.eval()
    with torch.no_grad():
        expected = model(tokens())
        assert torch.equal(fresh(tokens()), expected)
        plain = merge_lora(fresh)
        assert not any(isinstance(m, LoRALinear) for m in plain.modules())
        assert set(plain.state_dict()) == set(Llama(model.config).state_dict())
        assert (plain(tokens()) - expected).abs().max() < 1e-5


def test_targets_cover_all_linear_layers():
    model, lora = lora_model()
    assert lora == LoRAConfig(4, 8, 0.0, tuple(ALL_LINEAR), ())
    assert not hasattr(model, "lora_config")  # the config is returned, never hidden on the model
    n = sum(isinstance(m, LoRALinear) for m in model.modules())
    assert n == len(ALL_LINEAR) * model.config.n_layers
    assert type(model.lm_head) is torch.nn.Linear  # the head is never a LoRA target here


def _saved_bytes(fn, *args) -> tuple[torch.Tensor, int]:
    """Run fn(*args) and count the bytes autograd saves for backward (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(storages.values())


def _lora_inputs(p: float, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 12, generator=g).to(dtype).requires_grad_()
    A = (torch.randn(3, 12, generator=g) * 0.3).to(dtype).requires_grad_()
    B = (torch.randn(7, 3, generator=g) * 0.3).to(dtype).requires_grad_()
    keep = torch.rand(x.shape, generator=g) >= p if p > 0 else None
    drops = (~keep).reshape(-1).nonzero().view(-1).to(torch.int32) if p > 0 else None  # LoRAUpdate's form
    return x, A, B, keep, drops


def test_lora_update_equals_the_autograd_definition_with_and_without_dropout():
    for p in (0.0, 0.3):
        for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
            x, A, B, keep, drops = _lora_inputs(p, dtype)
            ours = LoRAUpdate.apply(x, A, B, drops, 2.0, p)
            ref = lora_update_reference(x, A, B, keep, 2.0, p)
            assert (ours.float() - ref.float()).abs().max() <= tol
            grad = torch.randn(ours.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
            got = torch.autograd.grad(ours, (x, A, B), grad)
            want = torch.autograd.grad(ref, (x, A, B), grad)
            for name, a, b in zip("xAB", got, want):
                assert (a.float() - b.float()).abs().max() <= tol * max(1.0, b.float().abs().max()), (p, dtype, name)
    # Added into a base output in place: the same sum, and the base's own gradient is grad_out.
    x, A, B, keep, drops = _lora_inputs(0.3)
    W = torch.randn(7, 12, generator=torch.Generator().manual_seed(5), requires_grad=True)
    grad = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(6))
    ours = LoRAUpdate.apply(x, A, B, drops, 2.0, 0.3, x @ W.t())
    ref = x @ W.t() + lora_update_reference(x, A, B, keep, 2.0, 0.3)
    assert torch.allclose(ours, ref, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, (x, A, B, W), grad), torch.autograd.grad(ref, (x, A, B, W), grad)):
        assert torch.allclose(a, b, atol=1e-5)
    dx = torch.autograd.grad(LoRAUpdate.apply(x, A, B, drops, 2.0, 0.3).sum(), x)[0]
    assert torch.all(dx[~keep] == 0) and torch.all(dx[keep] != 0)  # dropped inputs get no gradient


def test_lora_update_owning_the_frozen_product_equals_autograd_of_the_whole_layer():
    # weight= mode: LoRAUpdate computes x W^T + bias itself and accumulates g W into dx's
    # buffer; every gradient must equal autograd of the plain definition, for a frozen W and bias.
    for p in (0.0, 0.3):
        x, A, B, keep, drops = _lora_inputs(p)
        g = torch.Generator().manual_seed(7)
        W, bias = torch.randn(7, 12, generator=g), torch.randn(7, generator=g)
        grad = torch.randn(2, 5, 7, generator=g)
        ours = LoRAUpdate.apply(x, A, B, drops, 2.0, p, None, W, bias)
        ref = x @ W.t() + bias + lora_update_reference(x, A, B, keep, 2.0, p)
        assert torch.allclose(ours, ref, atol=1e-6)
        for name, a, b in zip("xAB", torch.autograd.grad(ours, (x, A, B), grad),
                              torch.autograd.grad(ref, (x, A, B), grad)):
            assert torch.allclose(a, b, atol=1e-5), (p, name)
    # A LoRALinear with a frozen base takes this path, and its dx still holds the frozen part
    layer = LoRALinear(torch.nn.Linear(12, 7), r=3, alpha=6, dropout=0.3).train()
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 12, requires_grad=True)
    torch.manual_seed(2)
    out = layer(x)
    assert out.grad_fn.name().startswith("LoRAUpdate")
    torch.manual_seed(2)
    keep = keep_mask(dropout_drops(x, 0.3), x.shape)
    ref = x @ layer.weight.t() + layer.bias + lora_update_reference(x, layer.lora_A, layer.lora_B, keep, 2.0, 0.3)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0], atol=1e-5)


def test_lora_layers_reading_one_input_save_it_once_with_their_dropped_positions():
    # q, k and v read the same x: autograd must keep x once, plus the dropped positions (int32)
    # and the [N, r] product per layer (the frozen base matmul saves only its weight). The plain
    # definition keeps each layer's own dropped-out copy of x instead (PEFT: and a float mask).
    x, *_ = _lora_inputs(0.3)
    layers = [LoRALinear(torch.nn.Linear(12, 7, bias=False), r=3, alpha=6, dropout=0.3).train() for _ in range(3)]
    for layer in layers:
        layer.weight.requires_grad_(False)  # frozen, as apply_lora leaves it
    torch.manual_seed(5)
    _, ours = _saved_bytes(lambda: [layer(x) for layer in layers])
    torch.manual_seed(5)
    drops = [dropout_drops(x, 0.3) for _ in layers]
    _, ref = _saved_bytes(lambda: [x @ m.weight.t() + lora_update_reference(x, m.lora_A, m.lora_B,
                                                                           keep_mask(d, x.shape), 2.0, 0.3)
                                   for m, d in zip(layers, drops)])
    n, weights = x.numel(), 3 * 4 * (7 * 12 + 3 * 12 + 7 * 3)  # W, A, B of each layer, fp32
    xa = 3 * 4 * (10 * 3)                                        # [N=10, r=3] fp32 per layer
    dropped = sum(d.numel() for d in drops)
    assert 0 < dropped < 3 * n
    assert ours == weights + 4 * n + 4 * dropped + xa            # x once + each layer's int32 positions
    assert ref == weights + 3 * 4 * n + 3 * n + xa               # three dropped-out copies of x, bool masks


def test_dropout_drops_are_sorted_positions_and_keep_mask_inverts_them():
    torch.manual_seed(0)
    for shape, p in (((4, 256, 576), 0.05), ((3, 5), 0.3), ((1,), 0.5), ((2, 3, 7), 0.9)):
        x = torch.empty(shape)
        drops = dropout_drops(x, p)
        assert drops.dtype == torch.int32 and drops.dim() == 1
        assert torch.all(drops[1:] > drops[:-1]) and (drops.numel() == 0 or 0 <= drops.min() <= drops.max() < x.numel())
        keep = keep_mask(drops, x.shape)
        assert keep.shape == shape and int((~keep).sum()) == drops.numel()
        assert torch.equal((~keep).reshape(-1).nonzero().view(-1).to(torch.int32), drops)
    by_hand = keep_mask(torch.tensor([0, 4, 5], dtype=torch.int32), torch.Size([2, 3]))
    assert by_hand.tolist() == [[False, True, True], [True, False, False]]
    assert dropout_drops(torch.empty(3), 0.0) is None and keep_mask(None, torch.Size([3])) is None
    with pytest.raises(ValueError, match="dropout must be in"):
        LoRALinear(torch.nn.Linear(4, 4), r=2, alpha=4, dropout=1.0)


def _check_bernoulli(keep: torch.Tensor, p: float):
    """keep [n] bool: i.i.d. Bernoulli(1 - p), checked by the rate, by the rate of neighbouring
    pairs both dropped (p^2 if independent) and by the gap lengths (geometric)."""
    n = keep.numel()
    drop = ~keep
    rate = drop.float().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), (p, rate)   # 5 standard deviations
    pairs = (drop[1:] & drop[:-1]).float().mean().item()
    assert abs(pairs - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (n / 2)), (p, pairs)  # pairs overlap: n/2
    gaps = torch.diff(drop.nonzero().view(-1)).float()
    for k in (1, 2, 5):  # P(gap = k) = (1 - p)^(k - 1) p
        want = (1 - p) ** (k - 1) * p
        got = (gaps == k).float().mean().item()
        assert abs(got - want) < 5 * math.sqrt(want * (1 - want) / gaps.numel()), (p, k, got, want)


def test_dropout_drops_draw_independent_bernoulli_trials(monkeypatch):
    torch.manual_seed(1)
    for p in (0.05, 0.1, 0.5):
        _check_bernoulli(keep_mask(dropout_drops(torch.empty(1_000_000), p), torch.Size([1_000_000])), p)
    # The draw-more loop (rarely needed at 8 standard deviations) gives the same distribution:
    # force it by drawing far too few gaps at a time.
    monkeypatch.setattr(lora, "SIGMAS", -900)  # 16 gaps per draw at p = 0.05 and n = 2e5
    _check_bernoulli(keep_mask(dropout_drops(torch.empty(200_000), 0.05), torch.Size([200_000])), 0.05)


def test_lora_linear_uses_dropout_in_training_only():
    layer = LoRALinear(torch.nn.Linear(12, 7, bias=False), r=3, alpha=6, dropout=0.3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 12)
    torch.manual_seed(11)
    trained = layer.train()(x)
    torch.manual_seed(11)
    mask = keep_mask(dropout_drops(x, 0.3), x.shape)
    expected = x @ layer.weight.t() + lora_update_reference(x, layer.lora_A, layer.lora_B, mask, 2.0, 0.3)
    assert torch.allclose(trained, expected, atol=1e-6)
    evaluated = layer.eval()(x)
    assert torch.allclose(evaluated, x @ layer.weight.t() + lora_update_reference(
        x, layer.lora_A, layer.lora_B, None, 2.0, 0.3), atol=1e-6)
    assert not torch.allclose(trained, evaluated, atol=1e-3)
