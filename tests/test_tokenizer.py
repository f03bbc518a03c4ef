"""model/tokenizer.py (+ spm.py, tokenizer_json.py, gguf_tokenizer.py) against reference tokenizers on real English, Thai and Traditional Chinese.

References (test oracles only): sentencepiece for LLaMA-2, tiktoken (with Meta's own pattern and
special tokens) for LLaMA-3, the `tokenizers` library for SmolLM2 (built from the GGUF
vocab/merges exactly as SmolLM2's tokenizer.json: Digits then ByteLevel) and TinyStories, and
transformers.AutoTokenizer for saved folders.
"""
from __future__ import annotations

import functools
import json
import itertools

import pytest

from model import assets
from model.gguf_tokenizer import tokenizer_from_gguf
from model.tokenizer import LLAMA3_SPECIALS, load_tokenizer
from tests.conftest import need, need_module

EDGE = ["", " ", "   leading spaces", "trailing  ", "a  b   c\n\n\n  d\t\t e", "line\r\nbreak\n",
        "12345 1234567 3.14159", "I'm can't we'll THEY'RE you'd", "emoji 😀👍🏽 ok", "x\u00a0y\u3000z\u2028",
        "สวัสดีครับ 123", "臺灣大學", "<s> <|im_start|> <|begin_of_text|>"]


@functools.lru_cache(maxsize=None)
def _texts() -> tuple[str, ...]:
    """~200 lines of each real file (skips when ../shared is absent) plus edge cases."""
    lines = []
    for name in ("th_tud.txt", "th_wisesight.txt", "zh_tw_drcd.dev.txt", "en_wiki_demo.txt"):
        path = need(assets.shared_file, "data", "mono", name)
        with open(path, encoding="utf-8") as f:
            lines += [line.rstrip("\n") for line in itertools.islice(f, 200)]
    return tuple(lines + EDGE)


def _check(ours, ref_encode, texts, roundtrip=True):
    bad = [x for x in texts if ours.encode(x) != ref_encode(x)]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ, first: {bad[0][:80]!r}"
    if roundtrip:
        bad = [x for x in texts if ours.decode(ours.encode(x)) != x]
        assert not bad, f"decode(encode(x)) != x for {bad[0][:80]!r}"


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def llama2():
    return load_tokenizer(need(assets.llama2_tokenizer))


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(need(assets.llama3_tokenizer))


@pytest.fixture(scope="module")
def smollm2_meta():
    from model.gguf import GGUFFile
    return GGUFFile(need(assets.smollm2_gguf)).metadata


@pytest.fixture(scope="module")
def smollm2(smollm2_meta):
    return tokenizer_from_gguf(smollm2_meta)


@pytest.fixture(scope="module")
def tinystories():
    return load_tokenizer(need(assets.tinystories_dir))


# ------------------------------------------------------------------------- parity with refs
def test_llama2_matches_sentencepiece(llama2):
    spm = need_module("sentencepiece")
    ref = spm.SentencePieceProcessor(model_file=str(assets.llama2_tokenizer()))
    _check(llama2, ref.encode, _texts())
    assert (llama2.bos_id, llama2.eos_id, llama2.pad_id, llama2.vocab_size) == (1, 2, None, 32000)
    assert llama2.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}


def test_llama3_matches_tiktoken(llama3):
    tiktoken = need_module("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    from model.pretokenize import LLAMA3_PATTERN
    ranks = load_tiktoken_bpe(str(assets.llama3_tokenizer()))
    ref = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: 128000 + i for i, s in enumerate(LLAMA3_SPECIALS)})
    _check(llama3, ref.encode_ordinary, _texts())
    assert llama3.vocab_size == 128256
    for piece, i in [("<|begin_of_text|>", 128000), ("<|end_of_text|>", 128001), ("<|start_header_id|>", 128006),
                     ("<|end_header_id|>", 128007), ("<|eot_id|>", 128009), ("<|reserved_special_token_245|>", 128255)]:
        assert llama3.token_to_id(piece) == ref.encode_single_token(piece) == i


def test_llama3_special_list_matches_meta():
    """Our copy of the special-token list equals llama_models' own (read from its source)."""
    need(assets.llama3_tokenizer)
    tiktoken = need_module("tiktoken")  # llama_models imports it
    from llama_models.llama3.tokenizer import Tokenizer as Meta
    assert tiktoken and Meta(assets.llama3_tokenizer()).special_tokens == {s: 128000 + i for i, s in enumerate(LLAMA3_SPECIALS)}


def _smollm2_reference(meta):
    tk = need_module("tokenizers")
    tokens = meta["tokenizer.ggml.tokens"]
    ref = tk.Tokenizer(tk.models.BPE({t: i for i, t in enumerate(tokens)},
                                     [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]))
    ref.pre_tokenizer = tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Digits(individual_digits=True),
                                                    tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.decoder = tk.decoders.ByteLevel()
    return ref


def test_smollm2_matches_tokenizers(smollm2, smollm2_meta):
    ref = _smollm2_reference(smollm2_meta)
    _check(smollm2, lambda x: ref.encode(x, add_special_tokens=False).ids, _texts())
    ids = smollm2.encode(_texts()[0])
    assert smollm2.decode(ids) == ref.decode(ids)
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id) == (1, 2, 2)
    assert smollm2.token_to_id("<|im_start|>") == 1 and smollm2.token_to_id("<|im_end|>") == 2
    assert smollm2.encode("12345") == [smollm2.token_to_id(d) for d in "12345"]  # digits one by one


def test_tinystories_matches_tokenizers(tinystories):
    tk = need_module("tokenizers")
    ref = tk.Tokenizer.from_file(str(assets.tinystories_dir() / "tokenizer.json"))
    # The 2048-token vocabulary has no byte tokens: Thai/Chinese become <unk> (ids still match;
    # the text cannot round-trip), so round trips are checked on covered text only.
    _check(tinystories, lambda x: ref.encode(x, add_special_tokens=False).ids, _texts(), roundtrip=False)
    covered = ["Once upon a time, there was a little girl.", "  Lily said, \"Hi!\"\n\nThe end.", "", " x"]
    _check(tinystories, lambda x: ref.encode(x, add_special_tokens=False).ids, covered)
    for x in covered:
        ids = tinystories.encode(x)
        assert tinystories.decode(ids) == ref.decode(ids, skip_special_tokens=False)
    assert (tinystories.bos_id, tinystories.eos_id, tinystories.pad_id) == (1, 2, 0)


# ------------------------------------------------------------------------ interface details
def test_bos_eos_and_plain_text_specials(llama2, llama3, smollm2):
    for tok in (llama2, llama3, smollm2):
        text = "Hello there"
        plain = tok.encode(text)
        assert tok.encode(text, bos=True) == [tok.bos_id] + plain
        assert tok.encode(text, eos=True) == plain + [tok.eos_id]
        # Special-token text inside plain text stays ordinary text (cannot forge control ids).
        forged = tok.encode("<s></s><|begin_of_text|><|im_start|><|eot_id|>")
        assert not set(forged) & set(tok.special_tokens.values())
        assert tok.decode([tok.bos_id] + plain) == tok.id_to_token(tok.bos_id) + text
    with pytest.raises(KeyError, match="not in the"):
        llama3.token_to_id("<|no such token|>")


def test_save_load_round_trip_and_transformers(tmp_path, llama2, llama3, smollm2, tinystories):
    transformers = need_module("transformers")
    texts = list(_texts()[::25]) + EDGE
    for name, tok in [("llama2", llama2), ("smollm2", smollm2), ("tinystories", tinystories), ("llama3", llama3)]:
        folder = tmp_path / name
        tok.save(folder)
        back = load_tokenizer(folder)
        assert type(back) is type(tok)
        assert (back.bos_id, back.eos_id, back.vocab_size) == (tok.bos_id, tok.eos_id, tok.vocab_size)
        hf = transformers.AutoTokenizer.from_pretrained(str(folder))
        for x in texts:
            ids = tok.encode(x)
            assert back.encode(x) == ids, (name, x)
            if not any(s in x for s in tok.special_tokens):  # HF turns those into special ids
                assert hf.encode(x, add_special_tokens=False) == ids, (name, x)
        assert hf.bos_token_id == tok.bos_id and hf.eos_token_id == tok.eos_id


def test_saved_config_keeps_other_keys(tmp_path, smollm2):
    import json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    smollm2.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == "{{ x }}" and config["bos_token"] == "<|im_start|>"


def test_add_special_tokens(tmp_path):
    tok = load_tokenizer(need(assets.llama2_tokenizer))  # a fresh copy: this test edits it
    before = tok.encode("<EN> hello <TH>")
    ids = tok.add_special_tokens(["<EN>", "<TH>", "<RESPONSE>"])
    assert ids == [32000, 32001, 32002] and tok.vocab_size == 32003
    assert tok.add_special_tokens(["<TH>", "</s>"]) == [32001, 2]  # existing ones keep their ids
    assert tok.encode("<EN> hello <TH>") == before  # still plain text
    assert tok.decode([ids[0]] + tok.encode("hello")) == "<EN>hello"
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.special_tokens["<RESPONSE>"] == 32002 and back.vocab_size == 32003


def test_gguf_llama_sentencepiece_metadata(llama2):
    """tokenizer.ggml.model == 'llama': rebuild the SentencePiece model from GGUF-style
    metadata (here made from the LLaMA-2 model itself) and get the same ids."""
    sp = llama2.sp
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(sp.get_piece_size())]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(32000)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(32000)], "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    tok = tokenizer_from_gguf(meta)
    texts = _texts()[::10]
    assert [tok.encode(x) for x in texts] == [llama2.encode(x) for x in texts]
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_unknown_formats_name_the_file(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00\x01 this is not a tokenizer")
    with pytest.raises(ValueError, match="tokenizer.model"):
        load_tokenizer(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "empty")
    wp = tmp_path / "wp.json"
    wp.write_text('{"model": {"type": "WordPiece", "vocab": {}}}')
    with pytest.raises(ValueError, match="wp.json"):
        load_tokenizer(wp)
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "bert"})


def test_pretokenize_translation_matches_unicode_classes():
    from model.pretokenize import translate
    rx = translate(r"\p{L}+|\p{N}+|\s+")
    assert [m.group() for m in rx.finditer("ab12 ²ⅷ\x1cx")] == ["ab", "12", " ", "²ⅷ", "x"]  # \x1c: not \s


def test_whole_thai_file_llama3_and_smollm2(llama3, smollm2, smollm2_meta):
    """The full ~0.9 MB Thai file in one call (long inputs, the per-word cache), once each."""
    tiktoken = need_module("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    from model.pretokenize import LLAMA3_PATTERN
    text = need(assets.shared_file, "data", "mono", "th_tud.txt").read_text(encoding="utf-8")
    ref = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, special_tokens={},
                            mergeable_ranks=load_tiktoken_bpe(str(assets.llama3_tokenizer())))
    ids = llama3.encode(text)
    assert ids == ref.encode_ordinary(text) and llama3.decode(ids) == text
    ids = smollm2.encode(text)
    assert ids == _smollm2_reference(smollm2_meta).encode(text, add_special_tokens=False).ids
    assert smollm2.decode(ids) == text


# --------------------------------------------------- BOS/EOS of hub-format tokenizer folders
def _frame_check(folder, texts):
    """Ours (encode with add_bos/add_eos) == `tokenizers` (default add_special_tokens) ==
    transformers.AutoTokenizer on every text, BOS/EOS included."""
    tk, transformers = need_module("tokenizers"), need_module("transformers")
    ours = load_tokenizer(folder)
    ref = tk.Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    for x in texts:
        if any(s in x for s in ours.special_tokens):  # the references turn those into special ids
            continue
        ids = ours.encode(x, bos=ours.add_bos, eos=ours.add_eos)
        assert ids == ref.encode(x).ids == hf(x)["input_ids"], x[:60]
    assert (hf.bos_token_id, hf.eos_token_id) == (ours.bos_id, ours.eos_id)
    return ours


@pytest.fixture(scope="module")
def llama3_hub_folder(tmp_path_factory):
    """A LLaMA-3 (Instruct) folder as the hub ships it, made here with transformers' converter
    from the real tiktoken file: BOS hidden in a Sequence[ByteLevel, TemplateProcessing]
    post-processor, eos <|eot_id|> in tokenizer_config.json, no add_bos_token flag."""
    tk = need_module("tokenizers")
    need_module("tiktoken")
    from transformers.convert_slow_tokenizer import TikTokenConverter
    tok = TikTokenConverter(vocab_file=str(need(assets.llama3_tokenizer)), extra_special_tokens=LLAMA3_SPECIALS).converted()
    bos = "<|begin_of_text|>"
    tok.post_processor = tk.processors.Sequence([
        tk.processors.ByteLevel(trim_offsets=False),
        tk.processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, 128000)])])
    folder = tmp_path_factory.mktemp("llama3-hub")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": bos, "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def test_llama3_hub_tokenizer_json_bos_in_sequence(llama3_hub_folder):
    spec = json.loads((llama3_hub_folder / "tokenizer.json").read_text())
    assert [p["type"] for p in spec["post_processor"]["processors"]] == ["ByteLevel", "TemplateProcessing"]
    ours = _frame_check(llama3_hub_folder, _texts()[::8])
    assert (ours.add_bos, ours.add_eos, ours.bos_id, ours.eos_id) == (True, False, 128000, 128009)
    from data.formats import orgcp  # the symptom: orgCP samples of Llama-3 started without BOS
    assert orgcp(ours, "ภาษาไทย")[0][0] == 128000


@pytest.fixture(scope="module")
def qwen2_tokens(tmp_path_factory):
    """A Qwen2-style byte-level BPE (NFC, Split regex + ByteLevel, no BOS), vocab and merges
    trained here with `tokenizers` on real en/th/zh text, written by transformers' own
    Qwen2Tokenizer.save_pretrained with the hub file's ByteLevel post-processor."""
    tk, transformers = need_module("tokenizers"), need_module("transformers")
    trainer = tk.trainers.BpeTrainer(vocab_size=3000, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.normalizer = tk.normalizers.NFC()
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(_texts()[::2], trainer)
    model = json.loads(bpe.to_str())["model"]
    tok = transformers.Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.backend_tokenizer.post_processor = tk.processors.ByteLevel(trim_offsets=False, add_prefix_space=False,
                                                                   use_regex=False)
    folder = tmp_path_factory.mktemp("qwen2")
    tok.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("eos", ["<|im_end|>", "<|endoftext|>"])  # Qwen2.5-Instruct / Qwen2.5 base
def test_qwen2_style_tokenizer_json(qwen2_tokens, tmp_path, eos):
    import shutil
    folder = tmp_path / "qwen"
    shutil.copytree(qwen2_tokens, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "bos_token": None, "eos_token": eos}))
    ours = _frame_check(folder, _texts()[1::4])
    assert (ours.add_bos, ours.add_eos, ours.bos_id) == (False, False, None)
    assert ours.eos_id == ours.token_to_id(eos)


def test_post_processor_forms_and_refusals(tmp_path):
    """Roberta/Bert frames (cls text sep), and a config flag contradicting the post-processor."""
    tk = need_module("tokenizers")
    spec = json.loads((need(assets.tinystories_dir) / "tokenizer.json").read_text())
    spec["post_processor"] = {"type": "RobertaProcessing", "sep": ["<|end_story|>", 2], "cls": ["<|start_story|>", 1],
                              "trim_offsets": True, "add_prefix_space": False}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    ours = load_tokenizer(tmp_path)
    ref = tk.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert (ours.add_bos, ours.add_eos) == (True, True)
    for x in ["Once upon a time", " a  b "]:
        assert ours.encode(x, bos=True, eos=True) == ref.encode(x).ids
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_eos_token": False}))
    with pytest.raises(ValueError, match="tokenizer_config.json: add_eos_token=False contradicts"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<unk>"}))
    with pytest.raises(ValueError, match="eos_token is id 0 but the tokenizer.json post_processor adds id 2"):
        load_tokenizer(tmp_path)
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "B", "type_id": 0}}],
                              "pair": [], "special_tokens": {}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="post_processor single template"):
        load_tokenizer(tmp_path)


def test_save_keeps_the_frame(tmp_path, llama3_hub_folder):
    """A hub-format tokenizer saved by us frames text the same in transformers."""
    transformers = need_module("transformers")
    ours = load_tokenizer(llama3_hub_folder)
    ours.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    back = load_tokenizer(tmp_path)
    x = "สวัสดี 臺灣 hello"
    assert back.encode(x, bos=back.add_bos) == hf(x)["input_ids"] == ours.encode(x, bos=True)
