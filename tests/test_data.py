"""data/: readers, training formats (exact loss masks), token files, packing, the distributed
resumable loader and the perplexity filter.

Most tests use CharTokenizer (one id per character, fixed special ids), so every expected id and
mask can be written by hand. The real tokenizers (LLaMA-2, LLaMA-3, SmolLM2/ChatML) are checked
at the end, skipping with the reason when an asset or model.tokenizer is missing.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from data.filter import llama_scorer, perplexity_filter
from data.formats import conversation_texts, format_records, inscp, orgcp, recovery, sft, tcot, translation
from data.loader import BatchLoader, PackedDataset
from data.packing import block_arrays, block_bounds
from kernels import IGNORE_INDEX as IGNORE
from data.prepare import PrepareConfig, prepare
from data.readers import DataError, InstructionFields, read_conversations, read_texts
from data.tokenfile import NoSamples, TokenFile, token_dtype, token_paths, tokenizer_identity, write_token_file
from model import assets
from model.chat import get_template
from tests.conftest import need


class CharTokenizer:
    """One id per character (ord + 16), special tokens below 16; never adds BOS/EOS itself."""
    SPECIALS = ["<pad>", "<s>", "</s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|im_start|>", "<|im_end|>", "<EN>", "<RESPONSE>", "<TH>"]

    def __init__(self, tags: bool = True, add_bos: bool = True):
        names = self.SPECIALS if tags else self.SPECIALS[:8]
        self.special_tokens = {name: i for i, name in enumerate(names)}
        self.bos_id, self.eos_id, self.pad_id, self.vocab_size = 1, 2, 0, 0x10000 + 16
        self.add_bos = add_bos

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [ord(c) + 16 for c in text] + [self.eos_id] * eos

    def decode(self, ids):
        names = {i: n for n, i in self.special_tokens.items()}
        return "".join(names[i] if i < 16 else chr(i - 16) for i in ids)

    def token_to_id(self, piece):
        return self.special_tokens.get(piece)


TOK = CharTokenizer()
TEXT = "臺灣的夏天很熱。"


def masked(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


# ---------------------------------------------------------------- readers

def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_lines_and_paragraphs(tmp_path):
    path = write(tmp_path, "a.txt", "第一行\n\n  第二行  \n第三行\n\n\n第四段\n")
    assert list(read_texts(path)) == ["第一行", "第二行", "第三行", "第四段"]
    assert list(read_texts(path, paragraphs=True)) == ["第一行", "第二行\n第三行", "第四段"]


def test_jsonl_texts_and_instructions(tmp_path):
    path = write(tmp_path, "t.jsonl", '{"body": "甲"}\n\n{"body": "乙"}\n')
    assert list(read_texts(path, field="body")) == ["甲", "乙"]
    path = write(tmp_path, "i.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"instruction": "翻譯", "input": "hello", "output": "你好", "system": "簡短回答。"},
        {"messages": [{"role": "user", "content": "嗨"}, {"role": "assistant", "content": "你好"}]},
        {"question": "問？", "answer": "答。"},
    ]))
    with pytest.raises(DataError, match=r"i\.jsonl:3: field 'instruction' is missing \(fields: answer, question\)"):
        list(read_conversations(path))
    convs = []
    with pytest.raises(DataError):
        for conv in read_conversations(path):
            convs.append(conv)
    assert convs == [
        [{"role": "system", "content": "簡短回答。"}, {"role": "user", "content": "翻譯\n\nhello"},
         {"role": "assistant", "content": "你好"}],
        [{"role": "user", "content": "嗨"}, {"role": "assistant", "content": "你好"}]]
    qa = write(tmp_path, "qa.jsonl", '{"question": "問？", "answer": "答。"}\n')
    assert list(read_conversations(qa, InstructionFields(instruction="question", output="answer"))) == [
        [{"role": "user", "content": "問？"}, {"role": "assistant", "content": "答。"}]]


@pytest.mark.parametrize("name,content,pattern", [
    ("empty.txt", "", r"data file .*empty\.txt has no documents: it is empty"),
    ("blank.jsonl", "\n  \n", r"data file .*blank\.jsonl has no documents"),
    ("bad.jsonl", '{"text": "a"}\n{"text": "b"\n', r"bad\.jsonl:2: malformed JSON"),
    ("list.jsonl", '{"text": "a"}\n[1]\n', r"list\.jsonl:2: expected a JSON object"),
    ("field.jsonl", '{"text": "a"}\n{"txt": "b"}\n', r"field\.jsonl:2: field 'text' is missing \(fields: txt\)"),
])
def test_reader_errors_name_file_and_line(tmp_path, name, content, pattern):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError, match=pattern) as err:
        list(read_texts(path))
    assert "\n" not in str(err.value)


def test_bad_messages_name_line(tmp_path):
    path = write(tmp_path, "m.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n'
                                      '{"messages": [{"role": "bot", "content": "b"}]}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:2: message 0 needs role"):
        list(read_conversations(path))


# ---------------------------------------------------------------- formats (hand-derived ids)

def test_inscp_llama3_is_the_papers_string():
    template = get_template(TOK, "llama3", system="You are a helpful assistant.")
    ids, mask = inscp(template, f"  {TEXT}\n")
    assert TOK.decode(ids) == ("<s><|start_header_id|>user<|end_header_id|>\n\n<|eot_id|>"
                               f"<|start_header_id|>assistant<|end_header_id|>\n\n{TEXT}<|eot_id|>")
    assert all(mask) and ids.count(TOK.bos_id) == 1


def test_inscp_chatml_has_no_system_turn():
    template = get_template(TOK, "chatml", system="You are a helpful AI assistant named SmolLM")
    ids, mask = inscp(template, TEXT)
    assert TOK.decode(ids) == f"<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n{TEXT}<|im_end|>\n"
    assert all(mask) and "system" not in TOK.decode(ids)


def test_inscp_llama2_empty_user_turn():
    template = get_template(TOK, "llama2", system="You are a helpful assistant.")
    ids, mask = inscp(template, TEXT)
    assert TOK.decode(ids) == f"<s>[INST]  [/INST] {TEXT} </s>"
    assert all(mask) and "<<SYS>>" not in TOK.decode(ids)


@pytest.mark.parametrize("add_bos,want", [(True, f"<s>{TEXT}</s>"), (False, f"{TEXT}</s>")])
def test_orgcp_plain_text(add_bos, want):
    ids, mask = orgcp(CharTokenizer(add_bos=add_bos), TEXT)
    assert TOK.decode(ids) == want and all(mask)


CONV = [{"role": "user", "content": "台北在哪裡？"}, {"role": "assistant", "content": "在臺灣北部。"},
        {"role": "user", "content": "高雄呢？"}, {"role": "assistant", "content": "在南部。"}]


@pytest.mark.parametrize("name,want_masked", [
    ("llama3", "在臺灣北部。<|eot_id|>在南部。<|eot_id|>"),
    ("chatml", "在臺灣北部。<|im_end|>在南部。<|im_end|>"),
    ("llama2", " 在臺灣北部。 </s> 在南部。 </s>"),
])
def test_sft_loss_on_assistant_tokens_only(name, want_masked):
    ids, mask = sft(get_template(TOK, name), CONV)
    assert masked(TOK, ids, mask) == want_masked
    assert ids.count(TOK.bos_id) <= (2 if name == "llama2" else 1)  # llama2: one <s> per exchange


def test_instruction_data_becomes_separate_inscp_samples():
    template = get_template(TOK, "llama3")
    got = list(format_records([CONV, "獨立的一段文字。"], "inscp", TOK, template))
    assert conversation_texts([{"role": "system", "content": "x"}] + CONV) == [m["content"] for m in CONV]
    assert [TOK.decode(ids).split("\n\n")[-1] for ids, _ in got] == [
        m["content"] + "<|eot_id|>" for m in CONV] + ["獨立的一段文字。<|eot_id|>"]
    assert [TOK.decode(ids) for ids, _ in format_records(["一", CONV[:2]], "orgcp", TOK)] == [
        "<s>一</s>", "<s>台北在哪裡？</s>", "<s>在臺灣北部。</s>"]


@pytest.mark.parametrize("tags", [True, False])
def test_tcot_tags_are_special_ids_when_the_tokenizer_has_them(tags):
    tok = CharTokenizer(tags=tags)
    ids, mask = tcot(get_template(tok, "llama3"), "สวัสดี", "Hello", "Hi there", "หวัดดี")
    answer = "<EN> Hello <RESPONSE> Hi there <TH> หวัดดี<|eot_id|>"
    assert masked(tok, ids, mask) == answer
    assert tok.decode(ids).endswith("user<|end_header_id|>\n\nสวัสดี<|eot_id|><|start_header_id|>assistant"
                                    "<|end_header_id|>\n\n" + answer)
    assert (8 in ids and 9 in ids and 10 in ids) == tags  # single special ids, or plain characters


def test_recovery_and_translation():
    template = get_template(TOK, "llama2", system="You are a helpful assistant.")
    ids, mask = recovery(template, [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}])
    assert TOK.decode(ids) == ("<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHi? [/INST]"
                               " <RESPONSE> Hello! </s>")
    assert masked(TOK, ids, mask) == " <RESPONSE> Hello! </s>"
    ids, mask = translation(template, "Good morning", "อรุณสวัสดิ์")
    assert "Translate the following English text into Thai.\n\nGood morning [/INST]" in TOK.decode(ids)
    assert masked(TOK, ids, mask) == " อรุณสวัสดิ์ </s>"


# ---------------------------------------------------------------- token files

def samples_of(lengths, seed=0, loss_prob=0.7):
    g = np.random.default_rng(seed)
    return [(g.integers(16, 5000, n).tolist(), (g.random(n) < loss_prob).tolist()) for n in lengths]


def test_token_file_round_trip(tmp_path):
    samples = samples_of([5, 1, 17, 3])
    meta = write_token_file(samples + [([], [])], tmp_path / "tok/", vocab_size=5000, tokenizer=tokenizer_identity(TOK),
                            fmt="sft", progress=False, chunk_tokens=7)  # chunks smaller than a sample
    tf = TokenFile(tmp_path / "tok")
    assert [tf.doc(i) for i in range(len(tf))] == samples
    assert meta == tf.meta and meta["dtype"] == "uint16" and meta["n_tokens"] == 26 and meta["n_docs"] == 4
    assert meta["n_loss_tokens"] == sum(sum(m) for _, m in samples)
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["mask.bin", "meta.json", "offsets.npy", "tokens.bin"]
    tf.check_tokenizer(TOK)
    with pytest.raises(ValueError, match="another tokenizer"):
        tf.check_tokenizer(OtherTokenizer())


class OtherTokenizer(CharTokenizer):
    def encode(self, text, bos=False, eos=False):
        return [ord(c) + 17 for c in text]


def test_token_dtype_and_prefix_form(tmp_path):
    assert token_dtype(32000) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(128256) == np.uint32
    big = [([70000, 16, 128000], [True, False, True])]
    write_token_file(big, tmp_path / "big", vocab_size=128256, progress=False, prefix=True)
    assert token_paths(tmp_path / "big")["tokens.bin"].name == "big.tokens.bin"
    tf = TokenFile(tmp_path / "big")
    assert tf.tokens.dtype == np.uint32 and tf.doc(0) == big[0]
    with pytest.raises(ValueError, match="token id 128000 outside the vocabulary"):
        write_token_file(big, tmp_path / "small", vocab_size=65536, progress=False, prefix=True)
    assert not list(tmp_path.glob("small*"))  # nothing half-written is left behind


def test_damaged_token_file_is_refused(tmp_path):
    write_token_file(samples_of([10, 10]), tmp_path / "t/", vocab_size=5000, progress=False)
    path = tmp_path / "t" / "tokens.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="damaged"):
        TokenFile(tmp_path / "t")


# ---------------------------------------------------------------- packing

def reference_blocks(samples, bounds, seq_len):
    """Brute force: walk the stream token by token."""
    tokens = [t for ids, _ in samples for t in ids]
    mask = [m for _, ms in samples for m in ms]
    doc = [d for d, (ids, _) in enumerate(samples) for _ in ids]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg, pos, lab, s, p = [], [], [], 0, 0
        for t in range(a, b):
            if t > a and doc[t] != doc[t - 1]:
                s, p = s + 1, 0
            seg.append(s)
            pos.append(p)
            p += 1
        for t in range(a, b):
            lab.append(tokens[t + 1] if t + 1 < b and doc[t + 1] == doc[t] and mask[t + 1] else IGNORE)
        out.append((tokens[a:b], lab, pos, seg))
    return out


@pytest.mark.parametrize("mode", ["stream", "whole"])
def test_packing_matches_brute_force_and_drops_nothing(mode):
    seq_len = 8
    samples = samples_of([3, 5, 1, 12, 8, 2, 9, 4, 30, 1])
    offsets = np.cumsum([0] + [len(s[0]) for s in samples])
    bounds = block_bounds(offsets, seq_len, mode)
    assert bounds[0] == 0 and bounds[-1] == offsets[-1] and np.all(np.diff(bounds) > 0)
    assert np.all(np.diff(bounds) <= seq_len)
    # offsets 0 3 8 9 21 29 31 40 44 74 75. whole: a document that does not fit starts a new block;
    # those longer than 8 (9-21, 31-40, 44-74) are cut in 8s and their tail shares the next block.
    assert bounds.tolist() == {"stream": [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 75],
                               "whole": [0, 8, 9, 17, 21, 29, 31, 39, 44, 52, 60, 68, 75]}[mode]
    ds = PackedDataset.from_samples(samples, seq_len, pack=mode, pad_id=0)
    stream = []
    for i, (tok, lab, pos, seg) in enumerate(reference_blocks(samples, bounds, seq_len)):
        item = ds[i]
        n = len(tok)
        assert all(v.dtype == torch.int64 and v.shape == (seq_len,) for v in item.values())
        assert item["tokens"][:n].tolist() == tok and item["labels"][:n].tolist() == lab
        assert item["positions"][:n].tolist() == pos and item["segments"][:n].tolist() == seg
        assert (item["labels"][n:] == IGNORE).all() and (item["segments"][n:] == seg[-1] + 1).all()
        stream += tok
    assert stream == [t for ids, _ in samples for t in ids]


def test_packed_documents_do_not_see_each_other():
    """A packed block gives each document the logits it gets alone: the proof of the mask."""
    from model.config import preset
    from model.llama import Llama
    model = Llama(preset("tiny", n_layers=2)).init_weights(seed=0).eval()
    docs = [[5, 9, 13], [200, 7, 7, 31, 2], [44, 45]]
    block = block_arrays(np.array(sum(docs, [])), np.ones(10, bool), np.array([0, 3, 8, 10]), 0, 10, 12)
    with torch.no_grad():
        packed = model(torch.from_numpy(block["tokens"])[None], positions=torch.from_numpy(block["positions"])[None],
                       segments=torch.from_numpy(block["segments"])[None])[0]
        start = 0
        for doc in docs:
            alone = model(torch.tensor([doc]))[0]
            torch.testing.assert_close(packed[start:start + len(doc)], alone, atol=1e-5, rtol=1e-5)
            start += len(doc)


# ---------------------------------------------------------------- loader

def toy_dataset(n_docs=37, seq_len=8):
    return PackedDataset.from_samples(samples_of([(i * 7) % 11 + 1 for i in range(n_docs)], seed=1), seq_len)


def block_ids(batch):
    return [tuple(row) for row in batch["tokens"].tolist()]


def test_loader_contract_and_determinism():
    ds = toy_dataset()
    a, b = BatchLoader(ds, 3, seed=7), BatchLoader(ds, 3, seed=7)
    batch = a.next_batch()
    assert set(batch) == {"tokens", "labels", "positions", "segments"}
    assert all(v.shape == (3, 8) and v.dtype == torch.int64 for v in batch.values())
    assert block_ids(batch) == block_ids(b.next_batch())
    assert block_ids(BatchLoader(ds, 3, seed=8).next_batch()) != block_ids(batch)
    assert len(a) == -(-len(ds) // 3) and a.tokens_per_epoch == len(ds) * 8


def test_ranks_are_disjoint_and_cover_the_global_batch():
    ds, B, W = toy_dataset(), 2, 3
    ranks = [BatchLoader(ds, B, rank=r, world_size=W, seed=3) for r in range(W)]
    whole = BatchLoader(ds, B * W, seed=3)
    seen = []
    for _ in range(len(ranks[0])):
        parts = [loader.indices(loader.step) for loader in ranks]
        for loader in ranks:
            loader.next_batch()
        assert sum(parts, []) == whole.indices(whole.step)
        whole.step += 1
        seen += sum(parts, [])
    first_epoch = seen[:len(ds)]
    assert sorted(first_epoch) == list(range(len(ds)))  # every block once per epoch
    assert ranks[0].state_dict()["epoch"] == 1


def test_resume_equals_uninterrupted_run():
    ds = toy_dataset()
    straight = BatchLoader(ds, 4, rank=1, world_size=2, seed=5)
    want = [block_ids(straight.next_batch()) for _ in range(12)]  # crosses two epoch edges
    first = BatchLoader(ds, 4, rank=1, world_size=2, seed=5)
    got = [block_ids(first.next_batch()) for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    resumed = BatchLoader(ds, 4, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(state)
    got += [block_ids(resumed.next_batch()) for _ in range(7)]
    assert got == want
    # elastic: 2 ranks x 4 -> 1 rank x 8 continues on the same global sequence
    one = BatchLoader(ds, 8, seed=5)
    one.load_state_dict(state)
    assert one.step == 5
    with pytest.raises(ValueError, match="seed"):
        BatchLoader(ds, 4, rank=1, world_size=2, seed=6).load_state_dict(state)


def test_loader_reads_a_token_file(tmp_path):
    samples = samples_of([3, 9, 4])
    write_token_file(samples, tmp_path / "t/", vocab_size=5000, fmt="orgcp", progress=False)
    from_file, in_memory = PackedDataset(tmp_path / "t", 4), PackedDataset.from_samples(samples, 4)
    assert len(from_file) == len(in_memory) == 4 and from_file.pack == "stream"
    for i in range(4):
        assert all(torch.equal(from_file[i][k], in_memory[i][k]) for k in ("tokens", "labels", "positions", "segments"))
    write_token_file(samples, tmp_path / "c/", vocab_size=5000, fmt="sft", progress=False)
    chat = PackedDataset(tmp_path / "c", 10)  # chat formats keep conversations whole
    assert chat.pack == "whole" and chat.bounds.tolist() == [0, 3, 12, 16]


def test_loader_refuses_a_state_saved_over_other_data(tmp_path):
    """A token file records its inputs by size and sha256; a loader over a file made from edited
    data (same number of blocks) refuses the old cursor instead of resuming onto other samples."""
    path = write(tmp_path, "d.txt", "\n".join(f"第{i}段文字，長一點的句子。" for i in range(12)))
    cfg = PrepareConfig(inputs=[str(path)], out=str(tmp_path / "a"), format="orgcp")
    meta = prepare(cfg, TOK, progress=False)
    assert meta["sources"] == [{"path": str(path), "bytes": path.stat().st_size,
                                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    first = BatchLoader(PackedDataset(cfg.out, 8), 2)
    first.next_batch()
    state = first.state_dict()
    path.write_text(path.read_text(encoding="utf-8").replace("第0段", "第9段"), encoding="utf-8")
    prepare(PrepareConfig(inputs=[str(path)], out=str(tmp_path / "b"), format="orgcp"), TOK, progress=False)
    edited = PackedDataset(tmp_path / "b", 8)
    assert len(edited) == len(first.dataset)
    with pytest.raises(ValueError, match="the training data changed since this state was saved"):
        BatchLoader(edited, 2).load_state_dict(state)
    BatchLoader(PackedDataset(cfg.out, 8), 2).load_state_dict(state)  # the same data resumes


def test_empty_token_file_leaves_no_folder(tmp_path):
    with pytest.raises(NoSamples, match="no samples to write"):
        write_token_file([([], [])], tmp_path / "t/", vocab_size=5000, progress=False)
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------- perplexity filter

def test_perplexity_filter_keeps_low_ppl():
    samples = [([16, 17], [True, True]), ([20, 21, 22], [True] * 3), ([30], [True]), ([40, 41], [True, True])]
    ppl = {16: 3.0, 20: 15.0, 30: 15.5, 40: float("nan")}
    stats = {}
    kept = list(perplexity_filter(samples, lambda batch: [np.log(ppl[ids[0]]) for ids in batch], 15.0,
                                  batch_size=3, stats=stats))
    assert kept == samples[:2] and stats == {"kept": 2, "dropped": 2}


def test_llama_scorer_batched_equals_alone():
    from model.config import preset
    from model.llama import Llama
    model = Llama(preset("tiny")).init_weights(seed=1).eval()
    batch = [[3, 50, 7, 9, 100], [8, 8], [1, 2, 3]]
    score = llama_scorer(model, pad_id=0)
    for ids, nll in zip(batch, score(batch)):
        logits = model(torch.tensor([ids]))[0, :-1]
        want = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
        assert abs(nll - want) < 1e-5


# ---------------------------------------------------------------- the bundled sample and prepare()

def test_bundled_sample_prepares_and_loads(tmp_path):
    from pathlib import Path
    folder = Path(__file__).resolve().parent.parent / "data" / "samples"
    assert sum(p.stat().st_size for p in folder.iterdir()) < 100_000
    texts = list(read_texts(folder / "zh_tw.txt"))
    assert len(texts) >= 60 and all(any("\u4e00" <= c <= "\u9fff" for c in t) for t in texts)
    template = get_template(TOK, "llama3")
    cfg = PrepareConfig(inputs=[str(folder / "zh_tw.txt"), str(folder / "zh_tw_qa.jsonl")], out=str(tmp_path / "tok/"),
                        format="inscp")
    meta = prepare(cfg, TOK, template, progress=False)
    n_qa = len(list(read_conversations(folder / "zh_tw_qa.jsonl")))
    assert meta["n_docs"] == len(texts) + 2 * n_qa and meta["n_loss_tokens"] == meta["n_tokens"]
    loader = BatchLoader(PackedDataset(cfg.out, 64, tokenizer=TOK), 2)
    assert loader.next_batch()["tokens"].shape == (2, 64)


def test_prepare_with_perplexity_filter(tmp_path):
    path = write(tmp_path, "d.txt", "短\n這是一段比較長的文字\n長一點的句子\n")
    cfg = PrepareConfig(inputs=[str(path)], out=str(tmp_path / "tok"), format="orgcp", ppl_threshold=15.0)
    by_length = lambda batch: [np.log(10.0 if len(ids) > 5 else 20.0) for ids in batch]  # noqa: E731
    meta = prepare(cfg, TOK, score=by_length, progress=False)
    assert meta["n_docs"] == 2 and meta["ppl_filter"]["counts"] == {"kept": 2, "dropped": 1}
    assert [TOK.decode(TokenFile(cfg.out).doc(i)[0]) for i in range(2)] == ["<s>這是一段比較長的文字</s>", "<s>長一點的句子</s>"]
    cfg.out = str(tmp_path / "none")
    with pytest.raises(DataError, match="perplexity filter dropped all 3 samples"):
        prepare(cfg, TOK, score=lambda batch: [9.0] * len(batch), progress=False)
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


# ---------------------------------------------------------------- real tokenizers

def real_tokenizer(kind):
    try:
        from model.tokenizer import load_tokenizer
    except ImportError as err:
        pytest.skip(f"model.tokenizer not importable yet ({err})")
    if kind == "chatml":
        from model.checkpoint import load_tokenizer_only
        return load_tokenizer_only(need(assets.smollm2_gguf))
    return load_tokenizer(need({"llama2": assets.llama2_tokenizer, "llama3": assets.llama3_tokenizer}[kind]))


ZH = "臺北是臺灣的首都，夏天很熱。"
QA = [{"role": "user", "content": "What is the capital of Taiwan?"}, {"role": "assistant", "content": ZH}]


@pytest.mark.parametrize("kind", ["llama2", "llama3", "chatml"])
def test_real_tokenizer_loss_masks(kind):
    tok = real_tokenizer(kind)
    template = get_template(tok, kind)
    end = tok.eos_id if kind == "llama2" else tok.token_to_id({"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}[kind])

    ids, mask = inscp(template, ZH)  # loss on every token, no system turn, one BOS at most
    assert all(mask) and tok.decode(ids) == {
        "llama2": f"<s>[INST]  [/INST] {ZH} </s>",
        "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|eot_id|>"
                   f"<|start_header_id|>assistant<|end_header_id|>\n\n{ZH}<|eot_id|>"),
        "chatml": f"<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n{ZH}<|im_end|>\n"}[kind]
    if kind != "chatml":
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    if kind == "llama3":  # header ids as Meta's tokenizer gives them: user 882, assistant 78191, "\n\n" 271
        assert ids[:10] == [128000, 128006, 882, 128007, 271, 128009, 128006, 78191, 128007, 271]
        assert ids[10:] == tok.encode(ZH) + [end]

    ids, mask = sft(template, QA)  # loss exactly on the answer and its end-of-turn token
    kept = [i for i, m in zip(ids, mask) if m]
    assert kept == tok.encode(ZH + (" " if kind == "llama2" else "")) + [end]
    first = mask.index(True)
    assert mask == [False] * first + [True] * len(kept) + [False] * (len(mask) - first - len(kept))
    assert tok.decode(ids[:first]).endswith({"llama2": "[/INST]", "llama3": "assistant<|end_header_id|>\n\n",
                                            "chatml": "<|im_start|>assistant\n"}[kind])


@pytest.mark.parametrize("kind", ["llama2", "llama3", "chatml"])
def test_real_tokenizer_orgcp(kind):
    """Plain text + EOS; BOS exactly when the model's tokenizer adds one (not SmolLM2's)."""
    tok = real_tokenizer(kind)
    ids, mask = orgcp(tok, ZH)
    assert all(mask) and ids[-1] == tok.eos_id and ids.count(tok.eos_id) == 1
    has_bos = kind != "chatml"
    assert ids.count(tok.bos_id) == has_bos and (ids[0] == tok.bos_id) == has_bos
    assert tok.decode(ids[has_bos:-1]).strip() == ZH


def test_real_tokenizer_tcot_tags_are_single_ids():
    """After vocabulary extension (TransLLM stage 0) the tags are one id each, inside the loss."""
    tok = real_tokenizer("llama2")
    tag_ids = tok.add_special_tokens(["<EN>", "<RESPONSE>", "<TH>"])
    template = get_template(tok, "llama2", system="You are a helpful assistant.")
    ids, mask = tcot(template, "สวัสดี", "Hello", "Hi there", "หวัดดี")
    kept = [i for i, m in zip(ids, mask) if m]
    assert [kept.count(i) for i in tag_ids] == [1, 1, 1] and kept[-1] == tok.eos_id
    assert tok.decode(kept) == "<EN> Hello <RESPONSE> Hi there <TH> หวัดดี </s>"
    assert tok.decode(ids).startswith("<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nสวัสดี [/INST]")
