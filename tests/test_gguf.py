"""model/gguf.py against independent oracles: gguf-py's GGUFReader / quants and transformers.

Real files: SmolLM2-135M-Instruct Q4_1 (tensors Q4_1, Q8_0, F32; also loaded by transformers) and
Q4_K_M (Q5_0, Q4_K, Q8_0, Q6_K, F32). Every supported type is also checked bit for bit on random
blocks in files written by gguf-py's GGUFWriter. Llama-3.1 rope scaling (llama.cpp's rope_freqs
tensor) is checked against transformers on a tiny random model written in llama.cpp's layout.
"""
from __future__ import annotations

import math
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from model import assets
from model.gguf import (GGUFFile, hf_name, iter_hf_tensors, llama3_rope_factors, llama3_scaling_from_rope_freqs,
                        llama_hf_config, permute_rotary, unpermute_rotary)
from tests.conftest import need, need_module


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_py():
    return need_module("gguf")


@pytest.fixture(scope="module")
def real_path():
    return need(assets.smollm2_gguf)


@pytest.fixture(scope="module")
def ours(real_path):
    return GGUFFile(real_path)


@pytest.fixture(scope="module")
def reader(gguf_py, real_path):
    return gguf_py.GGUFReader(real_path)


@pytest.fixture(scope="module")
def hf_model(real_path):
    """transformers' own GGUF loader (dequantises with gguf-py, un-permutes q/k): loaded once."""
    transformers = need_module("transformers")
    need_module("gguf")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(real_path.parent), gguf_file=real_path.name, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any loader failure is a reason to skip, said once
        pytest.skip(f"transformers could not load the GGUF offline ({type(err).__name__}: {err}); "
                    "the q/k permutation is still checked by test_unpermute_matches_interleaved_rope")
    return model


def write_gguf(gguf_py, path, tensors, arch="llama", kv=(), alignment=None):
    """Write a small GGUF with gguf-py: tensors is [(name, array, raw_dtype or None)]."""
    writer = gguf_py.GGUFWriter(path, arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value, vtype in kv:
        writer.add_key_value(key, value, vtype)
    for name, array, raw_dtype in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_one_line_error(excinfo, *needles):
    """A bad-input error: one line, no chained numpy traceback, naming every needle."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    err = excinfo.value
    assert err.__cause__ is None and (err.__suppress_context__ or err.__context__ is None)
    for needle in needles:
        assert str(needle) in message, (needle, message)


# --- header and metadata ---------------------------------------------------------------------

def test_metadata_matches_gguf_reader(ours, reader):
    assert ours.version == reader.fields["GGUF.version"].contents()
    assert len(ours.tensors) == reader.fields["GGUF.tensor_count"].contents()
    assert len(ours.metadata) == reader.fields["GGUF.kv_count"].contents()
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(expected)
    for key, value in expected.items():
        assert ours.metadata[key] == value, key
        assert type(ours.metadata[key]) is type(value), key
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == ours.metadata["llama.vocab_size"]


def test_tensor_infos_match_gguf_reader(ours, reader):
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == t.tensor_type.name
        assert info.shape == tuple(int(n) for n in reversed(t.shape))  # GGUF ne is reversed
        assert info.offset == t.data_offset
        assert info.nbytes == t.n_bytes


def test_ggml_type_table_matches_gguf_py(gguf_py):
    from model.gguf import _GGML_TYPES
    for type_id, (name, block, block_bytes) in _GGML_TYPES.items():
        qtype = gguf_py.GGMLQuantizationType(type_id)
        assert qtype.name == name
        assert gguf_py.GGML_QUANT_SIZES[qtype] == (block, block_bytes), name


# --- dequantisation --------------------------------------------------------------------------

def test_real_tensors_dequantise_like_gguf_py(gguf_py, ours, reader):
    seen = set()
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in seen:
            continue
        seen.add(kind)
        expected = gguf_py.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        got = ours.tensor(t.name)
        assert got.dtype == np.float32 and got.shape == ours.tensors[t.name].shape
        np.testing.assert_array_equal(got, expected.reshape(got.shape), err_msg=t.name)
    assert seen == {"F32", "Q8_0", "Q4_1"}


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_synthetic_types(gguf_py, tmp_path, kind):
    qtype = gguf_py.GGMLQuantizationType[kind]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 64)).astype(np.float32)  # 3-D: checks ne reversal beyond 2 dims
    x[0, 0, :32] = 0.0  # an all-zero block (scale 0)
    stored = gguf_py.quants.quantize(x, qtype)
    raw_dtype = None if kind in ("F32", "F16") else qtype
    # alignment 64 and a leading odd-sized tensor: data offsets must honour general.alignment
    path = write_gguf(gguf_py, tmp_path / f"{kind}.gguf",
                      [("odd", np.arange(3, dtype=np.float32), None), ("x", stored, raw_dtype)],
                      alignment=64)
    ours = GGUFFile(path)
    assert ours.tensors["x"].ggml_type == kind and ours.tensors["x"].shape == (3, 4, 64)
    assert ours.tensors["x"].offset % 64 == 0
    got = ours.tensor("x")
    oracle = gguf_py.quants.dequantize(gguf_py.GGUFReader(path).tensors[1].data, qtype)
    np.testing.assert_array_equal(got, oracle.astype(np.float32).reshape(got.shape))
    np.testing.assert_array_equal(ours.tensor("odd"), [0.0, 1.0, 2.0])
    if kind == "F32":
        np.testing.assert_array_equal(got, x)
    elif kind == "F16":
        np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
    else:
        # Layout sanity against the original values: error within the type's quantisation step.
        step = {"BF16": 2.0 ** -7, "Q8_0": 1 / 127, "Q4_0": 1 / 7, "Q4_1": 1 / 15}[kind]
        np.testing.assert_allclose(got, x, atol=np.abs(x).max() * step, rtol=0)


# Byte offsets of the fp16 fields inside one block, from ggml's block_* structs (ggml-common.h):
# random bytes anywhere else are valid data, but a random fp16 scale could be inf / nan.
FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "IQ4_NL": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.mark.parametrize("kind", sorted(FP16_FIELDS))
def test_random_blocks_equal_gguf_py_bit_for_bit(gguf_py, tmp_path, kind):
    """4096 blocks of random bytes (sane fp16 scales) in a GGUF file: our dequantisation equals
    gguf-py's reference bit for bit (gguf-py mirrors ggml's dequantize_row_*)."""
    qtype = gguf_py.GGMLQuantizationType[kind]
    block, block_bytes = gguf_py.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(sorted(FP16_FIELDS).index(kind))
    n_rows, blocks_per_row = 64, 64
    raw = rng.integers(0, 256, (n_rows * blocks_per_row, block_bytes), dtype=np.uint8)
    for start in FP16_FIELDS[kind]:
        scales = (rng.standard_normal(len(raw)) * 0.05).astype(np.float16)
        scales[:8] = 0.0  # a zero scale is a real case (an all-zero block)
        raw[:, start:start + 2] = scales.view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(n_rows, blocks_per_row * block_bytes)
    path = write_gguf(gguf_py, tmp_path / f"{kind}.gguf", [("w", raw, qtype)])
    ours = GGUFFile(path)
    got = ours.tensor("w")
    assert got.dtype == np.float32 and got.shape == (n_rows, blocks_per_row * block)
    expected = gguf_py.quants.dequantize(gguf_py.GGUFReader(path).tensors[0].data, qtype)
    assert expected.shape == got.shape
    np.testing.assert_array_equal(got.view(np.uint32), expected.astype(np.float32).view(np.uint32))
    assert np.isfinite(got).all() and np.unique(got).size > 1000  # the data really varied


def test_metadata_value_types(gguf_py, tmp_path):
    T = gguf_py.GGUFValueType
    kv = [("t.u8", 200, T.UINT8), ("t.i8", -5, T.INT8), ("t.u16", 60000, T.UINT16),
          ("t.i16", -30000, T.INT16), ("t.i32", -7, T.INT32), ("t.u64", 2 ** 40, T.UINT64),
          ("t.i64", -2 ** 40, T.INT64), ("t.f64", 0.1, T.FLOAT64), ("t.f32", 0.1, T.FLOAT32),
          ("t.b", True, T.BOOL), ("t.s", "héllo", T.STRING)]
    path = tmp_path / "kv.gguf"
    writer = gguf_py.GGUFWriter(path, "llama")
    for key, value, vtype in kv:
        writer.add_key_value(key, value, vtype)
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, 1.25])
    writer.add_array("t.bools", [True, False])
    writer.add_array("t.strs", ["a", "", "ü"])
    writer.add_array("t.empty", [])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = GGUFFile(path).metadata
    expected = {k: f.contents() for k, f in gguf_py.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert ours == expected
    assert ours["t.f32"] == float(np.float32(0.1)) and ours["t.f64"] == 0.1
    assert ours["t.strs"] == ["a", "", "ü"] and ours["t.b"] is True


# --- HF conversion: against transformers' GGUF loader ----------------------------------------

def test_all_tensors_match_transformers(ours, hf_model):
    hf = hf_model.state_dict()
    names = []
    for name, tensor in iter_hf_tensors(ours):
        names.append(name)
        assert name in hf, name
        assert tensor.dtype == torch.float32 and tensor.shape == hf[name].shape, name
        # Both sides dequantise the same bytes with the same float32 arithmetic: bit-exact.
        if not torch.equal(tensor, hf[name]):
            torch.testing.assert_close(tensor, hf[name].float(), rtol=0, atol=0, msg=name)
    assert len(names) == len(set(names)) == len(ours.tensors)
    # HF lists the tied lm_head separately; the GGUF (tie_word_embeddings) has no output.weight.
    assert set(hf) - set(names) == {"lm_head.weight"}


def test_config_matches_transformers(ours, hf_model):
    transformers = need_module("transformers")
    config = llama_hf_config(ours)
    hf = hf_model.config
    rope_theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert config["rope_theta"] == rope_theta
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == getattr(hf, key), key
    assert config["rope_scaling"] is None
    # The dict is a valid config.json: it builds a model whose parameters are exactly ours.
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    # named_parameters lists a tied lm_head once, as model.embed_tokens.weight
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == {
        hf_name(n): info.shape for n, info in ours.tensors.items()}


# --- q/k permutation: a hand-built check that needs no transformers --------------------------

def _rope_interleaved(x, pos, theta):
    """llama.cpp's rotary: rotate adjacent pairs (x0, x1), (x2, x3)... x: (heads, hd)."""
    hd = x.shape[-1]
    ang = pos * theta ** (-np.arange(0, hd, 2) / hd)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * np.cos(ang) - b * np.sin(ang)
    out[..., 1::2] = a * np.sin(ang) + b * np.cos(ang)
    return out


def _rope_half(x, pos, theta):
    """HF's rotary: rotate the pairs (x_i, x_{i + hd/2})."""
    hd = x.shape[-1]
    ang = pos * theta ** (-np.arange(0, hd, 2) / hd)
    a, b = x[..., :hd // 2], x[..., hd // 2:]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)], -1)


def test_unpermute_matches_interleaved_rope(ours):
    """Attention scores from the raw GGUF weights under llama.cpp's rope equal those from our
    un-permuted weights under HF's rope (real layer-0 q/k, 9 q heads, 3 kv heads)."""
    cfg = llama_hf_config(ours)
    n_head, n_kv, hd, theta = (cfg["num_attention_heads"], cfg["num_key_value_heads"],
                               cfg["head_dim"], cfg["rope_theta"])
    wq, wk = ours.tensor("blk.0.attn_q.weight"), ours.tensor("blk.0.attn_k.weight")
    hq, hk = unpermute_rotary(wq, n_head), unpermute_rotary(wk, n_kv)
    x = np.random.default_rng(0).standard_normal((2, wq.shape[1])).astype(np.float64)
    p_q, p_k = 7, 3  # query at position 7 attends to a key at position 3

    def scores(wq, wk, rope):
        q = rope((wq @ x[0]).reshape(n_head, hd), p_q, theta)
        k = rope((wk @ x[1]).reshape(n_kv, hd), p_k, theta)
        return np.einsum("hd,hd->h", q, np.repeat(k, n_head // n_kv, axis=0))

    np.testing.assert_allclose(scores(hq, hk, _rope_half), scores(wq, wk, _rope_interleaved), rtol=1e-9, atol=1e-9)
    # ...and the head count matters: un-permuting k as one big head breaks the scores.
    wrong = unpermute_rotary(wk, 1)
    assert not np.allclose(scores(hq, wrong, _rope_half), scores(wq, wk, _rope_interleaved))


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(1).standard_normal((3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rotary(llama_cpp_permute(w, 3), 3), w)
    np.testing.assert_array_equal(permute_rotary(w, 3), llama_cpp_permute(w, 3))  # the export direction


# --- llama_hf_config on hand-written metadata ------------------------------------------------

BASE = {
    "general.architecture": "llama", "llama.embedding_length": 64, "llama.feed_forward_length": 128,
    "llama.block_count": 2, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
    "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.context_length": 256,
    "tokenizer.ggml.tokens": ["a", "b", "c"], "tokenizer.ggml.bos_token_id": 0,
}


def test_config_fallbacks_and_rope_scaling():
    config = llama_hf_config(BASE, ["token_embd.weight", "output.weight"])
    assert config["vocab_size"] == 3 and config["head_dim"] == 16 and config["rope_theta"] == 10000.0
    assert config["tie_word_embeddings"] is False and config["bos_token_id"] == 0
    assert "eos_token_id" not in config and config["rope_scaling"] is None
    scaled = dict(BASE, **{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    assert llama_hf_config(scaled, [])["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    with pytest.raises(ValueError, match="rope_freqs"):  # llama-3.1 scaling would be dropped
        llama_hf_config(BASE, ["rope_freqs.weight"])
    with pytest.raises(ValueError, match="llama.block_count"):
        llama_hf_config({k: v for k, v in BASE.items() if k != "llama.block_count"}, [])


def test_non_llama_architecture_named(gguf_py, tmp_path):
    path = write_gguf(gguf_py, tmp_path / "qwen.gguf", [("token_embd.weight", np.zeros((2, 32), np.float32), None)],
                      arch="qwen2")
    ours = GGUFFile(path)
    for call in (lambda: llama_hf_config(ours), lambda: next(iter_hf_tensors(ours))):
        with pytest.raises(ValueError) as excinfo:
            call()
        assert_one_line_error(excinfo, path, "qwen2")


# --- bad input -------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        GGUFFile(tmp_path / "nothing.gguf")


def test_bad_magic_and_empty(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError) as excinfo:
        GGUFFile(bad)
    assert_one_line_error(excinfo, bad, "magic")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError) as excinfo:
        GGUFFile(empty)
    assert_one_line_error(excinfo, empty)


def test_truncated_real_file(real_path, ours, tmp_path):
    head = tmp_path / "head.gguf"
    with open(real_path, "rb") as src:
        head.write_bytes(src.read(1 << 20))  # cuts inside the tokenizer metadata
    with pytest.raises(ValueError) as excinfo:
        GGUFFile(head)
    assert_one_line_error(excinfo, head, "truncated")

    short = tmp_path / "short.gguf"
    shutil.copyfile(real_path, short)
    with open(short, "r+b") as f:
        f.truncate(real_path.stat().st_size - 100)  # header intact, last tensor's data cut
    last = max(ours.tensors.values(), key=lambda info: info.offset).name
    with pytest.raises(ValueError) as excinfo:
        GGUFFile(short)
    assert_one_line_error(excinfo, short, "truncated", last)


def test_unsupported_type_and_unknown_name(gguf_py, tmp_path):
    iq2 = gguf_py.GGMLQuantizationType.IQ2_XXS
    path = write_gguf(gguf_py, tmp_path / "iq2.gguf", [
        ("blk.0.attn_q.weight", np.zeros((2, 66), np.uint8), iq2),  # two IQ2_XXS blocks: (2, 256)
        ("blk.0.attn_foo.weight", np.zeros(4, np.float32), None),
    ], kv=[("llama.attention.head_count", 1, gguf_py.GGUFValueType.UINT32)])
    ours = GGUFFile(path)  # opening works: the type's size is known, only dequantising is not
    assert ours.tensors["blk.0.attn_q.weight"].shape == (2, 256)
    with pytest.raises(ValueError) as excinfo:
        ours.tensor("blk.0.attn_q.weight")
    assert_one_line_error(excinfo, path, "blk.0.attn_q.weight", "IQ2_XXS", "Q4_K", "Q6_K", "BF16")
    with pytest.raises(ValueError) as excinfo:
        list(iter_hf_tensors(ours))
    assert_one_line_error(excinfo, "IQ2_XXS")
    with pytest.raises(KeyError, match="nope"):
        ours.tensor("nope")

    path2 = write_gguf(gguf_py, tmp_path / "foo.gguf", [("blk.0.attn_foo.weight", np.zeros(4, np.float32), None)],
                       kv=[("llama.attention.head_count", 1, gguf_py.GGUFValueType.UINT32)])
    with pytest.raises(ValueError) as excinfo:
        list(iter_hf_tensors(GGUFFile(path2)))
    assert_one_line_error(excinfo, path2, "blk.0.attn_foo.weight")


def test_unsupported_type_refused_before_any_tensor_is_read(gguf_py, tmp_path, monkeypatch):
    """checkpoint.load names the file, the tensor and its type, and lists what is supported,
    before it dequantises anything (the unsupported tensor comes last in the file)."""
    from model import checkpoint
    T = gguf_py.GGUFValueType
    kv = [("llama.embedding_length", 256, T.UINT32), ("llama.feed_forward_length", 512, T.UINT32),
          ("llama.block_count", 1, T.UINT32), ("llama.attention.head_count", 2, T.UINT32),
          ("llama.attention.layer_norm_rms_epsilon", 1e-5, T.FLOAT32), ("llama.context_length", 64, T.UINT32)]
    path = write_gguf(gguf_py, tmp_path / "mixed.gguf", [
        ("token_embd.weight", np.zeros((8, 256), np.float32), None),
        ("blk.0.ffn_down.weight", np.zeros((256, 2 * 136), np.uint8), gguf_py.GGMLQuantizationType.IQ4_XS),
    ], kv=kv)
    reads = []
    monkeypatch.setattr(GGUFFile, "tensor", lambda self, name: reads.append(name))
    with pytest.raises(ValueError) as excinfo:
        checkpoint.load(path)
    assert_one_line_error(excinfo, path, "blk.0.ffn_down.weight", "IQ4_XS", "supported", "Q5_0", "Q4_K")
    assert reads == []


# --- llama-3.1 rope scaling: llama.cpp's rope_freqs tensor --------------------------------------

def llama_cpp_rope_factors(theta, head_dim, factor, low, high, old_ctx):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for rope_type llama3, verbatim
    in torch (fp32, as there): the per-pair divisors llama.cpp applies to the rotary angles."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_freq_wavelen, high_freq_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


# Just enough llama metadata for llama_hf_config: dim 32, 2 heads of 16.
TINY_KV = [("llama.embedding_length", 32, "UINT32"), ("llama.feed_forward_length", 64, "UINT32"),
           ("llama.block_count", 1, "UINT32"), ("llama.attention.head_count", 2, "UINT32"),
           ("llama.attention.layer_norm_rms_epsilon", 1e-5, "FLOAT32"), ("llama.context_length", 256, "UINT32"),
           ("llama.vocab_size", 256, "UINT32")]


def _kv(gguf_py):
    T = gguf_py.GGUFValueType
    return [(k, v, getattr(T, t)) for k, v, t in TINY_KV]


def llama3(factor, low, high, old_ctx):
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": old_ctx}


@pytest.mark.parametrize("theta, head_dim, scaling, metadata", [
    (500000.0, 128, llama3(8.0, 1.0, 4.0, 8192), {}),            # Llama-3.1-8B / 70B / 405B
    (500000.0, 64, llama3(32.0, 1.0, 4.0, 8192), {}),            # Llama-3.2-1B
    (500000.0, 128, llama3(32.0, 1.0, 4.0, 8192), {}),           # Llama-3.2-3B
    (10000.0, 32, llama3(4.0, 1.0, 4.0, 64), {}),                # fitted: not Meta's context
    (10000.0, 32, llama3(6.0, 1.0, 8.0, 100), {}),               # fitted: other factors too
    (10000.0, 32, llama3(4.0, 2.0, 8.0, 64), {"llama.rope.scaling.original_context_length": 64}),
    (10000.0, 16, llama3(4.0, 1.0, 4.0, 100), {}),               # one interpolated pair
    (500000.0, 16, llama3(8.0, 1.0, 4.0, 32), {}),               # none: a step from 1 to 8
])
def test_llama3_scaling_recovered_from_rope_freqs(theta, head_dim, scaling, metadata):
    factors = llama_cpp_rope_factors(theta, head_dim, *(scaling[k] for k in list(scaling)[1:]))
    assert 1 < (factors > 1).sum() < len(factors)  # some pairs scaled, some not
    got = llama3_scaling_from_rope_freqs(factors, head_dim, theta, metadata, "f.gguf")
    assert got == scaling
    # ...and our model turns each rotary pair exactly as llama.cpp does with the tensor.
    np.testing.assert_allclose(llama3_rope_factors(head_dim, theta, got), factors, rtol=1e-6)


def test_llama3_scaling_without_context_is_the_equivalent_meta_form():
    """(old 64, low 2, high 8) and (old 32, low 1, high 4) give the same frequencies: without
    llama.rope.scaling.original_context_length the reader returns the low_freq_factor=1 form."""
    factors = llama_cpp_rope_factors(10000.0, 32, 4.0, 2.0, 8.0, 64)
    assert llama3_scaling_from_rope_freqs(factors, 32, 10000.0, {}, "f.gguf") == llama3(4.0, 1.0, 4.0, 32)


def test_rope_freqs_that_are_not_llama3_are_refused():
    factors = llama_cpp_rope_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    bumped = factors.copy()
    bumped[30] *= 1.01  # one medium-frequency pair off the llama3 curve
    noise = 1 + np.random.default_rng(0).random(64).astype(np.float32)
    for bad in (bumped, noise):
        with pytest.raises(ValueError) as excinfo:
            llama3_scaling_from_rope_freqs(bad, 128, 500000.0, {}, "f.gguf")
        assert_one_line_error(excinfo, "f.gguf", "rope_freqs.weight", "llama3")
    with pytest.raises(ValueError) as excinfo:
        llama3_scaling_from_rope_freqs(factors, 64, 500000.0, {}, "f.gguf")
    assert_one_line_error(excinfo, "f.gguf", "rope_freqs.weight", "(64,)", "(32,)")
    assert llama3_scaling_from_rope_freqs(np.ones(64, np.float32), 128, 500000.0, {}, "f.gguf") is None


def test_rope_freqs_with_linear_metadata_refused(gguf_py, tmp_path):
    T = gguf_py.GGUFValueType
    path = write_gguf(gguf_py, tmp_path / "both.gguf",
                      [("rope_freqs.weight", llama_cpp_rope_factors(10000.0, 16, 4.0, 1.0, 4.0, 64), None)],
                      kv=_kv(gguf_py) + [("llama.rope.scaling.type", "linear", T.STRING),
                                         ("llama.rope.scaling.factor", 2.0, T.FLOAT32)])
    with pytest.raises(ValueError) as excinfo:
        llama_hf_config(GGUFFile(path))
    assert_one_line_error(excinfo, path, "rope_freqs.weight", "linear")




def write_llama_cpp_gguf(gguf_py, path, hf_model, rope_freqs=None):
    """An HF LlamaForCausalLM written as llama.cpp's convert_hf_to_gguf writes it (test-side:
    its tensor names, q/k permutation, metadata keys), with a 256-byte GPT-2 style vocabulary."""
    from model.bpe import bytes_to_unicode
    c = hf_model.config
    writer = gguf_py.GGUFWriter(path, "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list([bytes_to_unicode()[b] for b in range(256)])
    writer.add_token_types([1] * 256)
    writer.add_token_merges(["Ġ t"])
    if rope_freqs is not None:  # llama3: no rope scaling keys, only this tensor (as llama.cpp)
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "q_proj": "attn_q",
             "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
             "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for name, w in hf_model.state_dict().items():
        parts = name.split(".")
        w = w.float().numpy()
        if parts[-2] in ("q_proj", "k_proj"):
            heads = c.num_attention_heads if parts[-2] == "q_proj" else c.num_key_value_heads
            w = llama_cpp_permute(w, heads)
        block = f"blk.{parts[2]}." if parts[1] == "layers" else ""
        writer.add_tensor(f"{block}{names[parts[-2]]}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_llama31_gguf_logits_equal_transformers_past_original_context(gguf_py, tmp_path):
    """A tiny random Llama-3.1-style model (llama3 rope scaling, original context 64) written in
    llama.cpp's layout loads here with transformers' logits at positions 0..159."""
    transformers = need_module("transformers")
    from model.checkpoint import load
    scaling = llama3(4.0, 1.0, 4.0, 64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        initializer_range=0.1, rope_parameters={"rope_theta": 10000.0, **scaling},
        attn_implementation="eager")).eval()
    factors = llama_cpp_rope_factors(10000.0, 32, 4.0, 1.0, 4.0, 64)
    path = write_llama_cpp_gguf(gguf_py, tmp_path / "llama31.gguf", hf, rope_freqs=factors)
    ours, _ = load(path)
    assert ours.config.rope_scaling == scaling
    tokens = torch.randint(0, 256, (1, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours(tokens)
        assert (got - want).abs().max().item() < 1e-4
        # Guard: the scaling matters past the original context, so the check above could fail.
        ours.config.rope_scaling = None
        assert (ours(tokens) - want)[:, 64:].abs().max().item() > 0.1


# --- the real Q4_K_M file: K-quants and Q5_0 as llama.cpp's quantizer writes them -----------------

@pytest.fixture(scope="module")
def q4km_path():
    return need(assets.shared_file, "assets", "models", "smollm2-135m-q4km", "SmolLM2-135M-Instruct.Q4_K_M.gguf")


def test_q4km_every_tensor_dequantises_like_gguf_py(gguf_py, q4km_path):
    """All 272 tensors, bit for bit: the first tensor of each type whole, every 8th row of the
    others (rows dequantise independently; gguf-py on all 135M values would take ~10 s)."""
    ours = GGUFFile(q4km_path)
    reader = gguf_py.GGUFReader(q4km_path)
    kinds = Counter(t.tensor_type.name for t in reader.tensors)
    assert kinds == {"Q5_0": 166, "Q4_K": 16, "Q8_0": 15, "Q6_K": 14, "F32": 61}
    seen = set()
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert (info.ggml_type, info.offset, info.nbytes) == (t.tensor_type.name, t.data_offset, t.n_bytes)
        rows = slice(None) if info.ggml_type not in seen or t.data.ndim == 1 else slice(None, None, 8)
        seen.add(info.ggml_type)
        got = ours.tensor(t.name)[rows]
        expected = gguf_py.quants.dequantize(t.data[rows], t.tensor_type).astype(np.float32)
        np.testing.assert_array_equal(got.view(np.uint32), expected.reshape(got.shape).view(np.uint32),
                                      err_msg=t.name)


def test_q4km_loads_and_answers_sensibly(q4km_path):
    """checkpoint.load on the Q4_K_M file gives a working chat model. (transformers' own GGUF
    loader needs ~45 s for this file, too long for the suite: compared once by hand, all 273
    tensors were bit-equal to ours and the logits identical.)"""
    from model.chat import get_template
    from model.checkpoint import load
    from model.generate import Sampling, generate
    model, tokenizer = load(q4km_path)
    assert model.config.tie_embeddings and model.config.rope_scaling is None
    prompt = get_template(tokenizer).render(
        [{"role": "user", "content": "What are three good habits for learning a new language?"}],
        add_generation_prompt=True)
    answer = tokenizer.decode(generate(model, [prompt], Sampling(max_new_tokens=16, temperature=0.0, stop_ids=[]))[0])
    # The model's own greedy words (the Q4_1 file answers alike): on topic, plain English.
    assert "language learning" in answer and answer.isascii(), answer
