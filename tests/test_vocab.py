"""Vocabulary extension (model/vocab.py) on the real LLaMA-2 tokenizer and Thai text: old ids and
old-text encodings unchanged, new pieces usable, Thai shorter; the resized model computes the
same logits for old tokens and its new rows are the mean of their old pieces' rows."""
from __future__ import annotations

import pytest
import torch

from model import assets, vocab
from model.config import preset
from model.llama import Llama
from model.tokenizer import load_tokenizer
from tests.conftest import need

EN = ["The quick brown fox jumps over the lazy dog.", "Hello, world! 12345 <EN> tags stay text",
      "  Leading spaces, tabs\tand\nnewlines; unicode: café, naïve, 東京."]


@pytest.fixture(scope="module")
def extended():
    base = load_tokenizer(need(assets.llama2_tokenizer))
    lines = [t for t in need(assets.shared_file, "data", "mono", "th_tud.txt").read_text("utf-8").splitlines() if t.strip()]
    new, report = vocab.extend_tokenizer(base, lines[:3000], vocab_size=1500)
    return base, new, report, lines[3000:]


def test_old_ids_and_old_text_unchanged(extended):
    base, new, report, _ = extended
    assert report["added_pieces"] > 1000 and new.vocab_size == base.vocab_size + report["added_pieces"] + 3
    for i in range(base.vocab_size):
        assert new.id_to_token(i) == base.id_to_token(i)
        assert new.sp.get_score(i) == base.sp.get_score(i)
    for text in EN:
        assert new.encode(text, bos=True) == base.encode(text, bos=True)
    assert (new.bos_id, new.eos_id, new.unk_id) == (base.bos_id, base.eos_id, base.unk_id)


def test_new_ids_decode_to_their_pieces_and_tags_are_special(extended):
    base, new, report, _ = extended
    hello = base.encode("Hi")
    for i in range(base.vocab_size, base.vocab_size + report["added_pieces"], 97):
        piece = new.id_to_token(i)
        assert any("\u0e00" <= c <= "\u0e7f" for c in piece)  # only Thai-script pieces were added
        assert new.decode(hello + [i]) == "Hi" + piece.replace("▁", " ")
    for tag, i in report["tag_ids"].items():
        assert new.special_tokens[tag] == i and new.decode([i]) == tag
        assert i not in new.encode(f"x {tag} y")  # plain text never produces a tag id


def test_thai_needs_fewer_tokens(extended, capsys):
    base, new, _, held_out = extended
    before, after = vocab.token_stats(base, held_out), vocab.token_stats(new, held_out)
    assert after.per_sentence < 0.5 * before.per_sentence
    for s in held_out[:20]:
        assert new.decode(new.encode(s)) == s
    with capsys.disabled():
        print(f"\n  tokens per Thai sentence ({before.sentences} held-out th_tud lines): "
              f"{before.per_sentence:.1f} -> {after.per_sentence:.1f}")


def test_saved_tokenizer_loads_back(extended, tmp_path):
    _, new, _, held_out = extended
    new.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.vocab_size == new.vocab_size and again.special_tokens == new.special_tokens
    assert again.encode(held_out[0]) == new.encode(held_out[0])


@pytest.mark.parametrize("tied", [False, True])
def test_resize_keeps_old_logits_and_mean_inits_new_rows(extended, tied):
    base, new, report, _ = extended
    torch.manual_seed(0)
    model = Llama(preset("tiny", dim=16, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=32000,
                         tie_embeddings=tied)).init_weights(seed=0).eval()
    ids = torch.tensor([base.encode(EN[0], bos=True)])
    with torch.no_grad():
        before = model(ids)
    old_emb = model.model.embed_tokens.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    sources = vocab.resize_embeddings(model, base, new, init="mean")
    assert model.config.vocab_size == new.vocab_size == model.lm_head.weight.shape[0]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    with torch.no_grad():
        after = model(ids)
    assert torch.equal(after[..., :32000], before)
    emb = model.model.embed_tokens.weight
    for i in list(sources)[::211] + list(report["tag_ids"].values()):
        src = sources[i]
        assert src == vocab.old_split(base, new.id_to_token(i))
        assert torch.allclose(emb[i], old_emb[src].mean(0))
        if not tied:
            assert torch.allclose(model.lm_head.weight[i], old_head[src].mean(0))
    piece = next(new.id_to_token(i) for i in sources if new.id_to_token(i).startswith("▁"))
    assert base.sp.decode(vocab.old_split(base, piece)).strip() == piece.replace("▁", " ").strip()


def test_random_init_and_byte_level_tokenizer_skips_extension():
    tok = load_tokenizer(need(assets.tinystories_dir))
    new, report = vocab.extend_tokenizer(tok, ["สวัสดีครับ"] * 10)
    assert report["skipped"] and report["added_pieces"] == 0 and new.vocab_size == tok.vocab_size + 3
    assert tok.vocab_size == 2048  # the original object is untouched
    model = Llama(preset("tiny", vocab_size=2048, tie_embeddings=True)).init_weights(seed=0)
    vocab.resize_embeddings(model, tok, new, init="random")
    rows = model.model.embed_tokens.weight[2048:]
    assert rows.shape == (3, 64) and rows.abs().sum() > 0 and model.lm_head.weight.shape[0] == 2051
