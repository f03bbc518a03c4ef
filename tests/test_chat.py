"""model/chat.py: templates as code give the ids of each model's reference chat format."""
from __future__ import annotations

import pytest

from model import assets
from model.chat import get_template
from tests.conftest import need, need_module

CONVERSATION = [
    {"role": "user", "content": "สวัสดีครับ What is 2+2?"},
    {"role": "assistant", "content": "2+2 = 4. 台灣的首都是臺北。"},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.fixture(scope="module")
def smollm2():
    from model.checkpoint import load_tokenizer_only
    return load_tokenizer_only(need(assets.smollm2_gguf))


@pytest.fixture(scope="module")
def smollm2_hf():
    transformers = need_module("transformers")
    path = need(assets.smollm2_gguf)
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def llama3():
    from model.tokenizer import load_tokenizer
    return load_tokenizer(need(assets.llama3_tokenizer))


@pytest.fixture(scope="module")
def llama2():
    from model.tokenizer import load_tokenizer
    return load_tokenizer(need(assets.llama2_tokenizer))


def masked_text(tokenizer, ids, mask):
    return tokenizer.decode([i for i, m in zip(ids, mask) if m])


@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chatml_equals_smollm2_jinja(smollm2, smollm2_hf, with_system, generation_prompt):
    """Our ChatML code against transformers rendering SmolLM2's own Jinja template (which
    inserts its default system prompt when the conversation has none)."""
    messages = ([{"role": "system", "content": "Be brief."}] if with_system else []) + CONVERSATION
    if not generation_prompt:
        messages = messages[:-1]
    want = smollm2_hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                          return_dict=False)
    template = get_template(smollm2)
    assert template.name == "chatml"
    assert template.render(messages, add_generation_prompt=generation_prompt) == list(want)


def test_chatml_mask_and_stop_ids(smollm2):
    template = get_template(smollm2)
    ids, mask = template.render_with_mask(CONVERSATION[:2], default_system=False)
    assert masked_text(smollm2, ids, mask) == "2+2 = 4. 台灣的首都是臺北。<|im_end|>"
    assert smollm2.decode(ids).startswith("<|im_start|>user\n")  # no system turn when told so
    assert template.stop_ids == [smollm2.token_to_id("<|im_end|>")] + (
        [] if smollm2.eos_id == smollm2.token_to_id("<|im_end|>") else [smollm2.eos_id])


def test_llama3_equals_reference_string(llama3):
    """DESIGN.md's InsCP form, encoded by tiktoken with its special tokens allowed."""
    tiktoken = need_module("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(str(need(assets.llama3_tokenizer)))
    specials = {name: llama3.token_to_id(name) for name in
                ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    enc = tiktoken.Encoding("llama3", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    text = "ภาษาไทย 繁體中文 text."
    want = enc.encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|eot_id|>"
                      f"<|start_header_id|>assistant<|end_header_id|>\n\n{text}<|eot_id|>", allowed_special="all")
    messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": text}]
    ids, mask = get_template(llama3).render_with_mask(messages)
    assert ids == want
    assert ids.count(llama3.bos_id) == 1  # never a double BOS
    assert masked_text(llama3, ids, mask) == text + "<|eot_id|>"
    assert get_template(llama3).stop_ids == [specials["<|eot_id|>"], llama3.eos_id]


def test_llama3_generation_prompt(llama3):
    ids = get_template(llama3).render(CONVERSATION, add_generation_prompt=True)
    assert llama3.decode(ids).endswith("And 3+3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama2_equals_meta_reference(llama2):
    """Meta's llama chat_completion: per exchange bos + encode('[INST] {user} [/INST] {answer} ')
    + eos, the system prompt folded into the first user message."""
    spm = need_module("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(need(assets.llama2_tokenizer)))
    system = "You are a helpful assistant."
    messages = [{"role": "system", "content": system}] + CONVERSATION
    first = f"<<SYS>>\n{system}\n<</SYS>>\n\n{CONVERSATION[0]['content']}"
    want = [1] + sp.encode(f"[INST] {first} [/INST] {CONVERSATION[1]['content']} ") + [2]
    want += [1] + sp.encode(f"[INST] {CONVERSATION[2]['content']} [/INST]")
    template = get_template(llama2)
    assert template.name == "llama2"
    assert template.render(messages, add_generation_prompt=True) == want
    ids, mask = template.render_with_mask(messages[:3])
    assert ids[-1] == 2 and mask[-1]  # the answer's </s> is learned: it is how the model stops
    assert llama2.decode([i for i, m in zip(ids, mask) if m][:-1]).strip() == CONVERSATION[1]["content"]


def test_unknown_template_and_bad_message(smollm2):
    with pytest.raises(ValueError, match="unknown chat template"):
        get_template(smollm2, "vicuna")
    with pytest.raises(ValueError, match="message 0"):
        get_template(smollm2).render([{"role": "bot", "content": "x"}])
