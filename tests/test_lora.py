"""LoRA layer: merge exactness, PEFT as oracle for the saved adapter, gradient isolation."""
from __future__ import annotations

import torch

from model.config import preset
from model.llama import Llama
from model.lora import ALL_LINEAR, LoRALinear, apply_lora, load_adapter, merge_lora, save_adapter
from tests.conftest import need_module


def lora_model(seed=0, **kw):
    config = preset("tiny", vocab_size=300)
    model = Llama(config).init_weights(seed=seed)
    apply_lora(model, r=4, alpha=8, dropout=0.0, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B starts at zero; give it values so the update is visible
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model.eval()


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
    model = lora_model()
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
    model = lora_model(trainable_modules=["lm_head"]).train()
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
    model = lora_model(trainable_modules=["lm_head"])
    with torch.no_grad():  # a trained head: must travel in the adapter (PEFT modules_to_save)
        model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape) * 0.05)
    save_adapter(model, tmp_path / "adapter")
    # the base weights, as transformers sees them
    base = Llama(model.config).init_weights(seed=0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf()))
    hf.load_state_dict(base.state_dict(), strict=False)
    peft_model = peft.PeftModel.from_pretrained(hf.eval(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (peft_model(tokens()).logits - model(tokens())).abs().max() < 1e-4


def test_adapter_round_trip_and_merged_plain_model(tmp_path):
    model = lora_model(trainable_modules=["lm_head"])
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(Llama(model.config).init_weights(seed=0), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = model(tokens())
        assert torch.equal(fresh(tokens()), expected)
        plain = merge_lora(fresh)
        assert not any(isinstance(m, LoRALinear) for m in plain.modules())
        assert set(plain.state_dict()) == set(Llama(model.config).state_dict())
        assert (plain(tokens()) - expected).abs().max() < 1e-5


def test_targets_cover_all_linear_layers():
    model = lora_model()
    n = sum(isinstance(m, LoRALinear) for m in model.modules())
    assert n == len(ALL_LINEAR) * model.config.n_layers
    assert type(model.lm_head) is torch.nn.Linear  # the head is never a LoRA target here
