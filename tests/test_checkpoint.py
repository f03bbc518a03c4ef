"""model/checkpoint.py: HF folders and GGUF files in, HF folders out, checked against transformers."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from model import assets
from model.checkpoint import load, save
from model.config import preset
from model.generate import Sampling, generate
from model.llama import Llama
from tests.conftest import need, need_module


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct from its GGUF, and the same weights saved by us in HF form."""
    model, tokenizer = load(need(assets.smollm2_gguf))
    folder = save(model, tokenizer, tmp_path_factory.mktemp("smollm2") / "hf")
    return model, tokenizer, folder


def chat_prompt(tokenizer, text: str) -> list[int]:
    from model.chat import get_template
    return get_template(tokenizer).render([{"role": "user", "content": text}], add_generation_prompt=True)


def test_tinystories_loads_with_tied_head_and_matches_transformers():
    transformers = need_module("transformers")
    folder = need(assets.tinystories_dir)
    model, tokenizer = load(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # file stores lm_head only
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.tensor([tokenizer.encode("Once upon a time, there was a little dog.", bos=True)])
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() < 1e-4


def test_save_round_trip_here_and_in_transformers(tmp_path):
    transformers = need_module("transformers")
    folder = need(assets.tinystories_dir)
    model, tokenizer = load(folder)
    # A tiny shard limit forces the sharded layout with an index.
    out = save(model, tokenizer, tmp_path / "copy", max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    again, tok2 = load(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "The cat sat on the mat. It was happy."
    ids = tokenizer.encode(text, bos=True)
    assert tok2.encode(text, bos=True) == ids
    assert hf_tok(text)["input_ids"] == ids
    tokens = torch.tensor([ids])
    with torch.no_grad():
        want = model(tokens)
        assert torch.equal(again(tokens), want)
        assert (hf(tokens).logits - want).abs().max() < 1e-4


def test_save_replaces_an_existing_checkpoint_atomically(tmp_path):
    model = Llama(preset("tiny")).init_weights(seed=0)
    first = save(model, None, tmp_path / "ckpt")
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    save(model, None, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or aside folder left
    from safetensors.torch import load_file
    assert torch.equal(load_file(first / "model.safetensors")["lm_head.weight"], model.lm_head.weight)


def test_gguf_greedy_output_equals_hf_form(smollm2):
    """The GGUF path (dequantise + q/k unpermute) and the HF folder we wrote from it give the
    same greedy tokens, here and in transformers."""
    transformers = need_module("transformers")
    model, tokenizer, folder = smollm2
    prompt = chat_prompt(tokenizer, "What is the capital of France?")
    sampling = Sampling(max_new_tokens=12, temperature=0.0, stop_ids=[])
    from_gguf = generate(model, [prompt], sampling)[0]
    from_hf, _ = load(folder)
    assert generate(from_hf, [prompt], sampling)[0] == from_gguf
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                      pad_token_id=tokenizer.pad_id)
    assert out[0, len(prompt):].tolist() == from_gguf
    assert "Paris" in tokenizer.decode(from_gguf)


def test_smollm2_through_transformers5_save_pretrained_loads_with_the_gguf_logits(smollm2, tmp_path):
    """GGUF -> our save() -> transformers -> transformers 5's save_pretrained (rope_parameters
    form) -> our load(): the logits of the GGUF path, and our folder reads as transformers wrote it."""
    transformers = need_module("transformers")
    model, tokenizer, folder = smollm2
    ours_config = json.loads((folder / "config.json").read_text())
    assert "rope_theta" not in ours_config and "rope_scaling" not in ours_config
    assert ours_config["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf.save_pretrained(tmp_path / "hf5")
    theirs = json.loads((tmp_path / "hf5" / "config.json").read_text())
    assert theirs["rope_parameters"] == ours_config["rope_parameters"] and "rope_theta" not in theirs
    again, no_tokenizer = load(tmp_path / "hf5", tokenizer=False)  # save_pretrained wrote no tokenizer
    assert no_tokenizer is None
    tokens = torch.tensor([chat_prompt(tokenizer, "Name three colours of the rainbow.")])
    with torch.no_grad():
        want = model(tokens)
        assert (again(tokens) - want).abs().max().item() <= 1e-5
        assert (hf(tokens).logits - want).abs().max().item() < 1e-4


def test_weights_only_folder_loads_without_a_tokenizer_and_says_what_is_missing(tmp_path):
    model = Llama(preset("tiny")).init_weights(seed=0).eval()
    out = save(model, None, tmp_path / "step_100")  # an intermediate checkpoint: no tokenizer files
    again, tokenizer = load(out, tokenizer=False)
    assert tokenizer is None
    x = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    with pytest.raises(ValueError, match=r"step_100.*tokenizer\.json.*tokenizer\.model"):
        load(out)


def test_saved_chat_template_survives(smollm2):
    _, tokenizer, folder = smollm2
    _, tok2 = load(folder)
    assert tok2.chat_template == tokenizer.chat_template and "im_start" in tok2.chat_template
    assert chat_prompt(tok2, "hi") == chat_prompt(tokenizer, "hi")


# ---- bad input: one clear line, no deep traceback -------------------------------------------

def test_truncated_gguf_names_the_file(tmp_path):
    src = need(assets.smollm2_gguf)
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(5_000_000))
    with pytest.raises(ValueError, match="cut.gguf"):
        load(bad)


def test_config_that_is_not_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ValueError, match="config.json.*gpt2|gpt2.*config.json"):
        load(tmp_path)


def test_unknown_tokenizer_format(tmp_path):
    folder = need(assets.tinystories_dir)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 this is not a tokenizer \xff")
    with pytest.raises(ValueError, match="tokenizer.model"):
        load(tmp_path)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    model = Llama(preset("tiny")).init_weights(seed=0)
    out = save(model, None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["intermediate_size"] += 8
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(need(assets.tinystories_dir) / "tokenizer.json", out / "tokenizer.json")
    ffn, dim = model.config.ffn_dim, model.config.dim
    # whichever MLP weight comes first in the file is named, with the stored and implied shapes
    with pytest.raises(ValueError, match=rf"(gate_proj.weight has shape \({ffn}, {dim}\).*\({ffn + 8}, {dim}\)"
                                         rf"|down_proj.weight has shape \({dim}, {ffn}\).*\({dim}, {ffn + 8}\))"):
        load(out)


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load("/nonexistent/model")
