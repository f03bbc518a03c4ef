"""model/export_gguf.py: GGUF files in llama.cpp's layout, checked with independent oracles.

- gguf-py: GGUFReader reads our files; the GGUFWriter method llama.cpp's converter uses for each
  key fixes its value type; gguf.quants quantises Q8_0 (our bytes must equal its bytes).
- The llama.cpp-made SmolLM2 GGUF: exporting the model we loaded from it reproduces its
  llama.* / tokenizer.* metadata, tensor names, shapes and token list exactly.
- Loading back: every weight equals the source rounded by torch's fp16 cast / gguf.quants' Q8_0,
  the logits stay within that rounding's effect, the tokenizer encodes en/th/zh id for id.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from model import assets
from model.checkpoint import load, save
from model.config import preset
from model.export_gguf import export_gguf, main
from model.gguf_tokenizer import gguf_tokenizer_metadata, tokenizer_from_gguf
from model.gguf import GGUFFile, hf_name, quantize_q8_0, unpermute_rotary
from model.llama import Llama
from model.tokenizer import load_tokenizer
from tests.conftest import need, need_module
from tests.test_gguf import llama_cpp_permute  # convert_hf_to_gguf's permute, verbatim

EDGE = ["", "   leading spaces", "a  b   c\n\n  d\t e", "12345 3.14159", "I'm can't THEY'RE", "emoji 😀👍🏽",
        "สวัสดีครับ 123", "臺灣大學", "<s> <|im_start|> </s>"]
# Logit tolerances against the unrounded source, as a fraction of the source logits' spread:
# F16 keeps 11 significant bits per weight (relative error <= 2^-12); Q8_0 keeps 8 bits per
# 32-weight block relative to the block's largest (error <= max / 254), ~20x coarser. The bounds
# are ~3x what SmolLM2 shows (F16: 0.0075 std, Q8_0: 0.17 std at most over 24 positions); a
# wrong layout (q/k order, tensor names, tied head) moves logits by about one std or more.
LOGIT_TOL = {"f16": 0.025, "q8_0": 0.5}


def texts() -> list[str]:
    """30 real lines each of English, Thai and Traditional Chinese, plus edge cases."""
    lines = []
    for name in ("en_wiki_demo.txt", "th_tud.txt", "zh_tw_drcd.dev.txt"):
        with open(need(assets.shared_file, "data", "mono", name), encoding="utf-8") as f:
            lines += [line.rstrip("\n") for line in itertools.islice(f, 30)]
    return lines + EDGE


def rounded(name: str, w: torch.Tensor, kind: str, gguf_py, config) -> torch.Tensor:
    """What an exported weight must load back as: fp16-rounded by torch, or Q8_0 round-tripped by
    gguf.quants (on llama.cpp's q/k row order, as in the file; whole rows move, so blocks too)."""
    if w.dim() == 1 or kind == "f16":
        return w if w.dim() == 1 else w.half().float()
    heads = {"q_proj": config.n_heads, "k_proj": config.n_kv_heads}.get(name.split(".")[-2])
    x = w.numpy() if heads is None else llama_cpp_permute(w.numpy(), heads)
    q8 = gguf_py.GGMLQuantizationType.Q8_0
    x = gguf_py.quants.dequantize(gguf_py.quants.quantize(x, q8), q8)
    return torch.from_numpy(x if heads is None else unpermute_rotary(x, heads))


# For every key we write: the gguf-py GGUFWriter method llama.cpp's converter writes it with.
WRITER_METHODS = {
    "general.name": "add_name", "general.file_type": "add_file_type",
    "general.quantization_version": "add_quantization_version",
    "llama.vocab_size": "add_vocab_size", "llama.context_length": "add_context_length",
    "llama.embedding_length": "add_embedding_length", "llama.block_count": "add_block_count",
    "llama.feed_forward_length": "add_feed_forward_length", "llama.attention.head_count": "add_head_count",
    "llama.attention.head_count_kv": "add_head_count_kv", "llama.rope.freq_base": "add_rope_freq_base",
    "llama.attention.layer_norm_rms_epsilon": "add_layer_norm_rms_eps",
    "llama.rope.dimension_count": "add_rope_dimension_count", "llama.attention.key_length": "add_key_length",
    "llama.attention.value_length": "add_value_length", "llama.rope.scaling.type": "add_rope_scaling_type",
    "llama.rope.scaling.factor": "add_rope_scaling_factor",
    "tokenizer.ggml.model": "add_tokenizer_model", "tokenizer.ggml.pre": "add_tokenizer_pre",
    "tokenizer.ggml.tokens": "add_token_list", "tokenizer.ggml.scores": "add_token_scores",
    "tokenizer.ggml.token_type": "add_token_types", "tokenizer.ggml.merges": "add_token_merges",
    "tokenizer.ggml.bos_token_id": "add_bos_token_id", "tokenizer.ggml.eos_token_id": "add_eos_token_id",
    "tokenizer.ggml.unknown_token_id": "add_unk_token_id", "tokenizer.ggml.padding_token_id": "add_pad_token_id",
    "tokenizer.ggml.add_bos_token": "add_add_bos_token", "tokenizer.ggml.add_eos_token": "add_add_eos_token",
    "tokenizer.ggml.add_space_prefix": "add_add_space_prefix",
    "tokenizer.ggml.remove_extra_whitespaces": "add_remove_extra_whitespaces",
    "tokenizer.chat_template": "add_chat_template",
}


def assert_types_as_gguf_py_writes(gguf_py, reader) -> None:
    """Each key of our file has the value type (and array element type) gguf-py's writer gives it."""
    writer = gguf_py.GGUFWriter(None, "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # the writer adds these itself
            continue
        value = field.contents()
        if key == "llama.rope.scaling.type":
            value = gguf_py.RopeScalingType(value)
        getattr(writer, WRITER_METHODS[key])(value)
        expected = writer.kv_data[0][key]
        types = [expected.type]
        if expected.type == gguf_py.GGUFValueType.ARRAY:  # element type: as the writer packs it
            types.append(expected.sub_type or gguf_py.GGUFValueType.get_type(expected.value[0]))
        assert field.types == types, key


def assert_weights_are_rounded(model, state: dict, kind: str, gguf_py) -> None:
    for name, w in model.state_dict().items():
        want = rounded(name, w, kind, gguf_py, model.config)
        if not torch.equal(state[name], want):  # equal bit for bit; assert_close says where not
            torch.testing.assert_close(state[name], want, rtol=0, atol=0, msg=name)


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_py():
    return need_module("gguf")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct loaded from the llama.cpp-made Q4_1 GGUF (byte-level BPE, tied)."""
    path = need(assets.smollm2_gguf)
    model, tokenizer = load(path)
    return model, tokenizer, path


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    model, tokenizer, _ = smollm2
    out = tmp_path_factory.mktemp("export")
    return {kind: export_gguf(model, tokenizer, out / f"smollm2-{kind}.gguf", kind) for kind in ("f16", "q8_0")}


@pytest.fixture(scope="module")
def q8_reader(gguf_py, exported):
    return gguf_py.GGUFReader(exported["q8_0"])


@pytest.fixture(scope="module")
def reloaded(exported):
    return {kind: load(path) for kind, path in exported.items()}


# --- SmolLM2: the llama.cpp-made file as the oracle of layout and metadata ----------------------

def test_metadata_and_tensors_as_llama_cpp_wrote_them(gguf_py, smollm2, q8_reader):
    source = gguf_py.GGUFReader(smollm2[2])
    ours = q8_reader
    theirs = {k: f for k, f in source.fields.items() if k.startswith(("llama.", "tokenizer."))}
    # Not carried by our Tokenizer: the byte-level BPE has no unknown token, and
    # add_space_prefix only concerns SentencePiece models.
    theirs.pop("tokenizer.ggml.unknown_token_id")
    theirs.pop("tokenizer.ggml.add_space_prefix")
    for key, field in theirs.items():
        assert key in ours.fields, key
        assert ours.fields[key].types == field.types, key
        assert ours.fields[key].contents() == field.contents(), key
    extra = set(ours.fields) - set(source.fields)
    assert not extra, extra  # every key we write is one llama.cpp wrote for this model
    assert_types_as_gguf_py_writes(gguf_py, ours)
    assert ours.fields["general.architecture"].contents() == "llama"
    assert ours.fields["general.file_type"].contents() == gguf_py.LlamaFileType.MOSTLY_Q8_0
    assert ours.fields["general.quantization_version"].contents() == gguf_py.GGML_QUANT_VERSION
    src_tensors = {t.name: tuple(t.shape) for t in source.tensors}
    assert {t.name: tuple(t.shape) for t in ours.tensors} == src_tensors  # tied: no output.weight
    for t in ours.tensors:
        assert t.tensor_type.name == ("F32" if len(t.shape) == 1 else "Q8_0"), t.name


def test_q8_0_bytes_equal_gguf_quants(gguf_py, smollm2, q8_reader):
    """Our Q8_0 tensors are byte for byte gguf.quants.quantize of the llama.cpp-ordered source."""
    model, _, _ = smollm2
    state = model.state_dict()
    ours = q8_reader
    checked = 0
    for t in ours.tensors:
        if t.tensor_type.name != "Q8_0" or not (t.name.startswith(("token_embd", "blk.0.", "blk.29."))):
            continue
        name = hf_name(t.name)
        w = state[name].numpy()
        heads = {"q_proj": model.config.n_heads, "k_proj": model.config.n_kv_heads}.get(name.split(".")[-2])
        if heads:
            w = llama_cpp_permute(w, heads)
        expected = gguf_py.quants.quantize(w, gguf_py.GGMLQuantizationType.Q8_0)
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), expected.reshape(-1), err_msg=t.name)
        checked += 1
    assert checked == 1 + 2 * 7


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_reloaded_weights_and_logits(gguf_py, smollm2, reloaded, kind):
    model, tokenizer, _ = smollm2
    again, _ = reloaded[kind]
    assert again.config.to_hf() == model.config.to_hf()
    assert again.lm_head.weight is again.model.embed_tokens.weight
    state = again.state_dict()
    assert_weights_are_rounded(model, state, kind, gguf_py)
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris. In Thai, hello is สวัสดี and")])
    with torch.no_grad():
        want, got = model(ids), again(ids)
    assert (got - want).abs().max().item() < LOGIT_TOL[kind] * want.std().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9


def test_tokenizer_round_trip(smollm2, reloaded):
    _, tokenizer, _ = smollm2
    _, tok = reloaded["f16"]  # (the q8_0 file's tokenizer metadata is written by the same code)
    for attr in ("vocab_size", "bos_id", "eos_id", "pad_id", "add_bos", "add_eos", "chat_template", "special_tokens"):
        assert getattr(tok, attr) == getattr(tokenizer, attr), attr
    bad = [t for t in texts() if tok.encode(t) != tokenizer.encode(t)]
    assert not bad, f"{len(bad)} texts differ, first {bad[0][:60]!r}"


# --- a tiny random model with the LLaMA-2 SentencePiece tokenizer ------------------------------

@pytest.fixture(scope="module")
def tiny_llama2():
    """A random GQA model with LLaMA-2's vocabulary, head_dim != dim / heads and Llama-3.1 style
    rope scaling (3 of 16 rotary pairs interpolated), untied head."""
    tokenizer = load_tokenizer(need(assets.llama2_tokenizer))
    tokenizer.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    config = preset("tiny", vocab_size=32000, n_heads=4, n_kv_heads=2, head_dim=32, max_seq_len=256,
                    rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    # std 0.1 (not HF's 0.02): attention then depends on q.k enough for layout errors to show
    return Llama(config).init_weights(std=0.1, seed=0).eval(), tokenizer


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_tiny_sentencepiece_model_round_trip(gguf_py, tiny_llama2, tmp_path, kind):
    model, tokenizer = tiny_llama2
    path = export_gguf(model, tokenizer, tmp_path / "tiny.gguf", kind)
    reader = gguf_py.GGUFReader(path)
    assert_types_as_gguf_py_writes(gguf_py, reader)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    sp = tokenizer.sp
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(32000)]
    np.testing.assert_array_equal(np.float32(fields["tokenizer.ggml.scores"]),
                                  np.float32([sp.get_score(i) for i in range(32000)]))
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3] and types[3:259] == [6] * 256 and set(types[259:]) == {1}
    assert (fields["tokenizer.ggml.add_bos_token"], fields["tokenizer.ggml.add_space_prefix"]) == (True, True)
    assert fields["tokenizer.ggml.remove_extra_whitespaces"] is False
    assert [fields[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown")] == [1, 2, 0]
    assert fields["llama.attention.key_length"] == fields["llama.attention.value_length"] == 32
    assert not any(k.startswith("llama.rope.scaling") for k in fields)  # llama3: only rope_freqs
    by_name = {t.name: t for t in reader.tensors}
    assert by_name["rope_freqs.weight"].tensor_type.name == "F32" and "output.weight" in by_name

    again, tok = load(path)
    assert again.config.rope_scaling == model.config.rope_scaling  # rebuilt from rope_freqs
    state = again.state_dict()
    assert_weights_are_rounded(model, state, kind, gguf_py)
    ids = torch.randint(0, 32000, (1, 128), generator=torch.Generator().manual_seed(0))  # past context 64
    with torch.no_grad():
        want, got = model(ids), again(ids)
    assert (got - want).abs().max().item() < LOGIT_TOL[kind] * want.std().item()
    assert tok.chat_template == tokenizer.chat_template and tok.add_bos
    bad = [t for t in texts() if tok.encode(t) != tokenizer.encode(t)]
    assert not bad, f"{len(bad)} texts differ, first {bad[0][:60]!r}"


def test_wrong_layout_would_fail_the_logit_tolerance(tiny_llama2, tmp_path, monkeypatch):
    """Guard for the tolerances above: q/k rows left in HF order are far outside them."""
    import model.export_gguf as export
    model, tokenizer = tiny_llama2
    monkeypatch.setattr(export, "permute_rotary", lambda w, heads: w)
    again, _ = load(export_gguf(model, tokenizer, tmp_path / "broken.gguf", "f16"))
    ids = torch.randint(0, 32000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(ids), again(ids)
    assert (got - want).abs().max().item() > 4 * LOGIT_TOL["q8_0"] * want.std().item()


def test_linear_rope_scaling_written_as_metadata(gguf_py, tmp_path):
    tokenizer = load_tokenizer(need(assets.llama2_tokenizer))
    model = Llama(preset("tiny", vocab_size=32000, rope_scaling={"rope_type": "linear", "factor": 4.0}))
    path = export_gguf(model.init_weights(seed=0), tokenizer, tmp_path / "linear.gguf", "f16")
    reader = gguf_py.GGUFReader(path)
    assert_types_as_gguf_py_writes(gguf_py, reader)
    assert reader.fields["llama.rope.scaling.type"].contents() == "linear"
    assert reader.fields["llama.rope.scaling.factor"].contents() == 4.0
    assert "rope_freqs.weight" not in GGUFFile(path).tensors
    assert load(path)[0].config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_add_eos_and_padded_vocabulary_round_trip():
    """Metadata level (no file): add_eos_token survives, and embedding rows beyond the tokenizer
    become unused [PAD<i>] tokens that no text encodes to."""
    tokenizer = load_tokenizer(need(assets.llama2_tokenizer))
    tokenizer.add_eos = True
    metadata = {key: value for key, _, value in gguf_tokenizer_metadata(tokenizer, 32008)}
    assert metadata["tokenizer.ggml.tokens"][-8:] == [f"[PAD{i}]" for i in range(32000, 32008)]
    assert metadata["tokenizer.ggml.token_type"][-8:] == [5] * 8
    again = tokenizer_from_gguf(metadata)
    assert (again.add_bos, again.add_eos, again.vocab_size) == (True, True, 32008)
    text = "[PAD32001] hello สวัสดี"
    assert again.encode(text) == tokenizer.encode(text)
    with pytest.raises(ValueError, match="31999"):
        gguf_tokenizer_metadata(tokenizer, 31999)


# --- quantiser, CLI, refusals -----------------------------------------------------------------

def test_q8_0_quantiser_equals_gguf_quants_with_ties(gguf_py):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    x[0, :32] = 0.0                                                  # all-zero block
    x[1, :32] = np.arange(32) - 15.5                                 # not ties: x / d is irrational-ish
    x[2, :32] = np.concatenate([[127.0], np.arange(31) - 15 + 0.5])  # d = 1: exact .5 ties
    x[3] *= 1e-30                                                    # fp16 underflow of d
    expected = gguf_py.quants.quantize(x, gguf_py.GGMLQuantizationType.Q8_0).reshape(-1)
    np.testing.assert_array_equal(quantize_q8_0(x), expected)


def test_cli_exports_a_saved_folder(tiny_llama2, tmp_path, capsys):
    model, tokenizer = tiny_llama2
    folder = save(model, tokenizer, tmp_path / "final")
    out = main([str(folder), str(tmp_path / "out.gguf"), "--type", "q8_0"])
    assert "wrote" in capsys.readouterr().out and out.exists()
    again, _ = load(out)
    ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (again(ids) - model(ids)).abs().max().item() < LOGIT_TOL["q8_0"] * model(ids).std().item()


def test_refusals_are_one_line_and_leave_no_file(tmp_path):
    folder = need(assets.tinystories_dir)  # SentencePiece-style BPE in tokenizer.json: no GGUF form
    out = tmp_path / "ts.gguf"
    with pytest.raises(SystemExit) as excinfo:
        main([str(folder), str(out)])
    message = str(excinfo.value)
    assert message.startswith("error: ") and "\n" not in message and "not byte-level" in message
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one
    with pytest.raises(SystemExit, match="nothing"):
        main([str(tmp_path / "nothing"), str(out)])
    model = Llama(preset("tiny", proj_bias=("q_proj", "k_proj", "v_proj"), family="qwen2"))
    with pytest.raises(ValueError, match="bias"):
        export_gguf(model, load_tokenizer(need(assets.llama2_tokenizer)), out)
    assert list(tmp_path.iterdir()) == []
