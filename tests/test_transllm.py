"""TransLLM: stage-3 sample masks (llama2 + ChatML), TCOT inference (tags, missing-tag continuation,
second turn from the English exchange), data builders' errors, and train/transllm.py end to end
on the real TinyStories-656K weights with the adapter carried from stage to stage."""
from __future__ import annotations

import json

import pytest
import torch

from data import tcot as build
from data.formats import recovery, tcot, translation
from data.readers import DataError
from data.tokenfile import TokenFile
from model import assets
from model.chat import get_template
from model.checkpoint import load
from model.tcot import TCOTChat, TCOTRunner, generate_tcot, render_with_tags
from model.tokenizer import load_tokenizer
from tests.conftest import need
from train.trainer import run_main

TAGS = ["<EN>", "<RESPONSE>", "<TH>"]
SYS = "You are a helpful assistant."


@pytest.fixture(scope="module")
def llama2():
    tok = load_tokenizer(need(assets.llama2_tokenizer))
    tok.add_special_tokens(TAGS)
    return tok


@pytest.fixture(scope="module")
def chatml():
    tok = load_tokenizer(need(assets.tinystories_dir))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"] + TAGS)
    return tok


def segs(*parts):
    """[(ids, trainable)] -> (ids, mask)."""
    ids, mask = [], []
    for seg, flag in parts:
        ids += seg
        mask += [flag] * len(seg)
    return ids, mask


# ------------------------------------------------------------------ exact stage-3 masks
def test_llama2_masks_of_tcot_recovery_translation(llama2):
    t, enc, s = get_template(llama2, "llama2", SYS), llama2.encode, llama2.special_tokens
    head = f"[INST] <<SYS>>\n{SYS}\n<</SYS>>\n\n"
    sp = enc(head + "x [/INST] ")[len(enc(head + "x [/INST]")):]  # the answer's leading space token(s)
    assert tcot(t, "สวัสดี", "Hello", "Hi there", "หวัดดี") == segs(
        ([llama2.bos_id] + enc(head + "สวัสดี [/INST]"), False), (sp, True), ([s["<EN>"]] + enc(" Hello "), True),
        ([s["<RESPONSE>"]] + enc(" Hi there "), True), ([s["<TH>"]] + enc(" หวัดดี "), True), ([llama2.eos_id], True))
    assert recovery(t, [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]) == segs(
        ([llama2.bos_id] + enc(head + "Hi? [/INST]"), False), (sp, True),
        ([s["<RESPONSE>"]] + enc(" Hello! "), True), ([llama2.eos_id], True))
    user = "Translate the following Thai text into English.\n\nแมว"
    ids, mask = translation(t, "แมว", "cat", "Thai", "English")
    prompt = [llama2.bos_id] + enc(head + user + " [/INST]")
    assert (ids, mask) == segs((prompt, False), (enc(head + user + " [/INST] cat ")[len(prompt) - 1:], True),
                               ([llama2.eos_id], True))


def test_chatml_masks_of_tcot_recovery_translation(chatml):
    t, enc, s = get_template(chatml, "chatml"), chatml.encode, chatml.special_tokens
    start, end = s["<|im_start|>"], s["<|im_end|>"]

    def user(text):
        return ([start] + enc("user\n" + text), False), ([end] + enc("\n"), False), ([start] + enc("assistant\n"), False)
    assert tcot(t, "Q th", "Q en", "A en", "A th") == segs(
        *user("Q th"), ([s["<EN>"]] + enc(" Q en "), True), ([s["<RESPONSE>"]] + enc(" A en "), True),
        ([s["<TH>"]] + enc(" A th"), True), ([end], True), (enc("\n"), False))
    assert recovery(t, [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]) == segs(
        *user("Hi?"), ([s["<RESPONSE>"]] + enc(" Hello!"), True), ([end], True), (enc("\n"), False))
    # user text and the answer's first word are one chunk ("assistant\nune chat"): its tokens
    # are credited to the answer from where the header's own encoding ends
    ids, mask = translation(t, "a cat", "une chat", "English", "French")
    chunk, header = enc("assistant\nune chat"), enc("assistant\n")
    assert chunk[:len(header)] == header
    assert (ids, mask) == segs(*user("Translate the following English text into French.\n\na cat")[:2], ([start], False),
                               (header, False), (chunk[len(header):], True), ([end], True), (enc("\n"), False))


# ------------------------------------------------------------------ TCOT inference
class FakeGen:
    """generate_fn returning scripted outputs and recording the prompts it was given."""
    def __init__(self, *outputs):
        self.outputs, self.prompts = list(outputs), []

    def __call__(self, prompt):
        self.prompts.append(list(prompt))
        return self.outputs.pop(0)


def test_tcot_tags_extracted(llama2):
    t, enc, s = get_template(llama2, "llama2", SYS), llama2.encode, llama2.special_tokens
    gen = FakeGen([s["<EN>"]] + enc(" What is it? ") + [s["<RESPONSE>"]] + enc(" It is a cat. ") + [s["<TH>"]] + enc(" แมว"))
    r = generate_tcot(None, llama2, t, "นี่คืออะไร", generate_fn=gen)
    assert (r["answer"], r["en_query"], r["en_answer"], r["appended"]) == ("แมว", "What is it?", "It is a cat.", [])
    assert gen.prompts == [t.render([{"role": "user", "content": "นี่คืออะไร"}], add_generation_prompt=True)]


def test_missing_tags_are_appended_and_generation_continues(llama2):
    t, enc, s = get_template(llama2, "llama2", SYS), llama2.encode, llama2.special_tokens
    first = [s["<EN>"]] + enc(" Q?")
    gen = FakeGen(first, enc(" A."), enc(" ตอบ"))
    r = generate_tcot(None, llama2, t, "ถาม", generate_fn=gen)
    prompt = gen.prompts[0]
    assert gen.prompts[1] == prompt + first + [s["<RESPONSE>"]]
    assert gen.prompts[2] == prompt + first + [s["<RESPONSE>"]] + enc(" A.") + [s["<TH>"]]
    assert r["appended"] == ["<RESPONSE>", "<TH>"] and (r["en_query"], r["en_answer"], r["answer"]) == ("Q?", "A.", "ตอบ")


def two_scripted_turns(tok) -> FakeGen:
    """A model that answers "what is it?" (a cat) and then "and a dog?" (it barks) by TCOT."""
    enc, s = tok.encode, tok.special_tokens
    turn1 = [s["<EN>"]] + enc(" What is it? ") + [s["<RESPONSE>"]] + enc(" It is a cat. ") + [s["<TH>"]] + enc(" แมว")
    turn2 = [s["<EN>"]] + enc(" And a dog? ") + [s["<RESPONSE>"]] + enc(" A dog barks. ") + [s["<TH>"]] + enc(" หมาเห่า")
    return FakeGen(turn1, turn2)


def test_second_turn_context_is_the_english_exchange(llama2):
    t, s, gen = get_template(llama2, "llama2", SYS), llama2.special_tokens, two_scripted_turns(llama2)
    chat = TCOTChat(None, llama2, t, generate_fn=gen)
    assert chat("นี่คืออะไร") == "แมว" and chat("แล้วหมาล่ะ") == "หมาเห่า"
    expected = render_with_tags(t, [{"role": "user", "content": "What is it?"},
                                    {"role": "assistant", "content": "<RESPONSE> It is a cat."},
                                    {"role": "user", "content": "แล้วหมาล่ะ"}])
    assert gen.prompts[1] == expected and s["<RESPONSE>"] in expected and s["<TH>"] not in expected
    text = llama2.decode(expected)
    assert "What is it? [/INST] <RESPONSE> It is a cat. </s><s>[INST] แล้วหมาล่ะ [/INST]" in text
    assert "นี่คืออะไร" not in text and "แมว" not in text
    # a tag typed by the user stays plain text
    assert s["<TH>"] not in render_with_tags(t, [{"role": "user", "content": "x <TH> y"}])


def test_tcot_runner_answers_mt_bench_turns_through_the_english_exchange(llama2):
    from eval import mtbench
    t, gen = get_template(llama2, "llama2", SYS), two_scripted_turns(llama2)
    runner = TCOTRunner(None, llama2, t, generate_fn=gen)
    questions = [{"question_id": 7, "category": "writing", "turns": ["นี่คืออะไร", "แล้วหมาล่ะ"], "lang": "th"}]
    (record,) = mtbench.generate_answers(runner, questions)
    assert record["answers"] == ["แมว", "หมาเห่า"]
    assert record["thoughts"] == [{"en_query": "What is it?", "en_answer": "It is a cat."},
                                  {"en_query": "And a dog?", "en_answer": "A dog barks."}]
    # turn 2 saw the English exchange of turn 1, not the Thai one (as TCOTChat builds it)
    assert gen.prompts[1] == render_with_tags(t, [{"role": "user", "content": "What is it?"},
                                                  {"role": "assistant", "content": "<RESPONSE> It is a cat."},
                                                  {"role": "user", "content": "แล้วหมาล่ะ"}])
    with pytest.raises(ValueError, match="not answered by this runner"):
        runner.answer([[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                        {"role": "user", "content": "z"}]])


# ------------------------------------------------------------------ bad input, one line each
def test_parallel_files_with_different_line_counts(tmp_path):
    (tmp_path / "en.txt").write_text("a\nb\nc\n")
    (tmp_path / "th.txt").write_text("ก\nข\n")
    with pytest.raises(DataError) as err:
        build.read_parallel(tmp_path / "en.txt", tmp_path / "th.txt")
    assert "3 lines" in str(err.value) and "2 lines" in str(err.value) and "\n" not in str(err.value)
    assert build.read_parallel(tmp_path / "en.txt", tmp_path / "en.txt")[0] == ("a", "a")


def test_kd_file_from_another_model_is_refused(tmp_path):
    from data.kd import pending
    ours = build.model_identity(need(assets.tinystories_dir))
    other = {"path": "/models/other", "fingerprint": "0" * 24}
    kd = tmp_path / "kd.jsonl"
    kd.write_text(json.dumps({"id": "1", "instruction": "Hi", "input": "", "output": "Hello", "model": other}) + "\n")
    with pytest.raises(DataError) as err:
        build.read_kd(kd, expect=ours)
    assert "another model" in str(err.value) and "/models/other" in str(err.value) and "\n" not in str(err.value)
    inst = tmp_path / "inst.jsonl"
    inst.write_text(json.dumps({"instruction": "Hi"}) + "\n")
    with pytest.raises(DataError, match="another model"):
        pending(str(inst), kd, ours)
    assert build.read_kd(kd, expect=other)[0]["output"] == "Hello"


def test_warmup_is_bounded_by_max_steps_and_each_stage_takes_its_share(capsys):
    from train.config import parse_args
    from train.transllm import TransLLMConfig, stage_config, stages
    cfg = parse_args(TransLLMConfig, ["--warmup-steps", "3", "--max-steps", "4", "--stage2.steps", "2",
                                      "--stage3.steps", "3"])
    assert [stage_config(cfg, s).warmup_steps for s in stages(cfg)] == [3, 2, 3]
    assert [stage_config(cfg, s).max_steps for s in stages(cfg)] == [4, 2, 3]
    with pytest.raises(SystemExit):
        parse_args(TransLLMConfig, ["--warmup-steps", "5", "--max-steps", "4", "--stage2.steps", "2",
                                    "--stage3.steps", "3"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "error: --warmup-steps 5: must be in [0, 4] (--max-steps)"


# ------------------------------------------------------------------ end to end
def argv(base, out, *extra):
    # TinyStories' tokenizer stores no chat template: name one (llama2 needs no special tokens)
    return ["--model", str(base), "--out-dir", str(out), "--template", "llama2", "--seq-len", "128", "--max-steps", "2",
            "--mono-lines", "10", "--english-lines", "2", "--parallel-lines", "8", "--qa-limit", "4",
            "--kd-limit", "4", "--kd-max-new-tokens", "8", "--translate-max-new-tokens", "8",
            "--translation-pairs", "4", "--stage1.lr", "1e-2", "--stage2.lr", "1e-2", "--no-progress", "--no-report",
            *extra]


def test_stage2_without_stage1_adapter_is_one_line(tmp_path, capsys):
    from train.transllm import main
    base = need(assets.tinystories_dir)
    run_main(main, argv(base, tmp_path / "run", "--stage", "0"))
    assert (tmp_path / "run" / "stage0" / "model" / "config.json").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_main(main, argv(base, tmp_path / "run", "--stage", "2"))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and "\n" not in err
    assert err.startswith("error: --stage 2: no stage-1 adapter at") and "stage1/adapter" in err


def test_stage_all_on_tinystories_carries_the_adapter(tmp_path):
    from train.transllm import TransLLMConfig, main, stage_dir, stages, start_model
    from train.config import parse_args
    base = need(assets.tinystories_dir)
    args = argv(base, tmp_path / "run", "--stage", "all")
    results = main(args)
    cfg = parse_args(TransLLMConfig, args)
    report = json.loads((stage_dir(cfg, 0) / "vocab_report.json").read_text())
    assert report["skipped"] and report["new_vocab_size"] == 2051  # byte-level BPE: tags only
    ids = torch.tensor([[1, 400, 500, 2048, 2049, 2050]])
    for k in (2, 3):  # stage k starts exactly where stage k-1 ended
        started, _, _ = start_model(cfg, stages(cfg)[k - 1])
        ended, _ = load(results[k - 1]["final"])
        with torch.no_grad():  # LoRA merged vs. applied: equal up to fp32 rounding
            a, b = started.eval()(ids), ended(ids)
        assert (a - b).abs().max() < 1e-4, (a - b).abs().max()
        meta = json.loads((stage_dir(cfg, k) / "stage.json").read_text())
        assert meta["started_from"].endswith(f"stage{k - 1}/adapter")
    from safetensors.torch import load_file
    w1 = load_file(stage_dir(cfg, 1) / "adapter" / "adapter_model.safetensors")
    w2 = load_file(stage_dir(cfg, 2) / "adapter" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys() and any(not torch.equal(w1[k], w2[k]) for k in w1)
    lora = json.loads((stage_dir(cfg, 3) / "adapter" / "adapter_config.json").read_text())
    assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"]) == (64, 128.0, 0.05)
    assert set(lora["modules_to_save"]) == {"embed_tokens", "lm_head"} and len(lora["target_modules"]) == 7
    (mix_dir,) = (stage_dir(cfg, 3) / "tokens").glob("mix-*/train")  # keyed on its parts
    mix = TokenFile(mix_dir)
    parts = [TokenFile(p) for p in mix.meta["parts"]]
    assert len(mix) == sum(len(p) for p in parts) and {p.meta["format"] for p in parts} == {"tcot", "recovery", "translation"}
    kd = build.read_kd(stage_dir(cfg, 3) / "data" / "kd.jsonl", expect=build.model_identity(base))
    assert len(kd) == 4
    final, tok = load(results[3]["final"])
    assert tok.special_tokens["<TH>"] == 2050 and final.config.vocab_size == 2051


def test_tag_zh_is_one_special_id_in_the_vocabulary_the_samples_and_tcot_inference(tmp_path, capsys, monkeypatch):
    """--tag ZH end to end: stage 0 adds <ZH> (not <TH>), the stage-3 TCOT samples hold that very id
    once each, TCOT inference appends and splits on it, and chat.py / eval.run refuse a --tag
    whose <TAG> the model does not have."""
    import io
    import sys
    from eval import quick, run as eval_run
    from model.tcot import tcot_tags
    from scripts import chat
    from train.transllm import main
    base = need(assets.tinystories_dir)
    need(quick.data_files)
    out = tmp_path / "run"
    small = ["--mono-lines", "4", "--parallel-lines", "4", "--qa-limit", "2", "--kd-limit", "1",
             "--tcot-translation", "none", "--translation-pairs", "2", "--seq-len", "64", "--micro-batch-size", "1",
             "--lora-r", "8"]  # TCOT samples from the QA rows only
    results = main(argv(base, out, "--stage", "all", "--tag", "ZH", "--max-steps", "1", *small, "--report",
                        "--report-sizes.nll-items", "1", "--report-sizes.prompts", "1",
                        "--report-sizes.max-new-tokens", "4", "--report-sizes.batch-size", "4"))
    final, tok = load(results[3]["final"])
    en, response, zh = (tok.special_tokens[t] for t in tcot_tags("ZH"))
    assert "<TH>" not in tok.special_tokens and zh == 2050
    assert json.loads((out / "stage0" / "vocab_report.json").read_text())["tag_ids"] == {
        "<EN>": 2048, "<RESPONSE>": 2049, "<ZH>": 2050}
    # the TCOT samples stage 3 trained on: <EN> q <RESPONSE> a <ZH> t, each tag one trained id
    (tcot_dir,) = (out / "stage3" / "tokens").glob("tcot-*/train")
    samples = [TokenFile(tcot_dir).doc(i) for i in range(len(TokenFile(tcot_dir)))]
    assert samples
    for ids, mask in samples:
        assert [ids.count(t) for t in (en, response, zh)] == [1, 1, 1]
        assert mask[ids.index(zh)] and ids.index(en) < ids.index(response) < ids.index(zh)
        assert "<ZH>" in tok.decode(ids) and "<TH>" not in tok.decode(ids)
    # TCOT inference with tags=tcot_tags("ZH"): a missing <ZH> is appended as that one id
    template = get_template(tok, "llama2")
    gen = FakeGen([en] + tok.encode(" Where? ") + [response] + tok.encode(" Here."), tok.encode(" There."))
    runner = TCOTRunner(final, tok, template, generate_fn=gen, tags=tcot_tags("ZH"))
    assert runner.answer([[{"role": "user", "content": "Where?"}]]) == ["There."]
    assert gen.prompts[1][-1] == zh and gen.prompts[1].count(zh) == 1
    # the run's report: the final model answered the Thai prompts by TCOT (no end-of-turn rate)
    saved = json.loads((out / "report.json").read_text())
    assert saved["models"]["stage 0"]["alignment"]["th"]["end_of_turn"] is not None
    assert saved["models"]["final"]["alignment"]["th"]["end_of_turn"] is None
    assert (out / "report.md").exists() and (out / "report_before.json").exists()
    # the front ends: --tag ZH works, --tag TH is refused in one line
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    model_dir = results[3]["final"]
    assert chat.main(["--model", model_dir, "--template", "llama2", "--tcot", "--tag", "ZH",
                      "--max-new-tokens", "4", "--prompt", "在哪裡？"]) == 0
    assert chat.main(["--model", model_dir, "--template", "llama2", "--tcot", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chat.py: error: --tag TH: <TH> is not a special token"), err
    with pytest.raises(SystemExit) as exit_:
        eval_run.main(["--model", model_dir, "--template", "llama2", "--suite", "mtbench", "--tcot",
                       "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--tag TH: <TH> is not a special token" in err, err


def test_no_recovery_kd_leaves_the_kd_samples_and_their_tcot_out_of_stage3(tmp_path, monkeypatch):
    """The ablation switch: with --no-recovery-kd, stage 3 has no recovery samples and no TCOT
    samples made from KD answers (the QA TCOT samples and the translation pairs stay), and the
    original model is never asked for KD answers."""
    from train import transllm
    from train.config import parse_args
    base = need(assets.tinystories_dir)
    kd_rows = [{"id": "1", "instruction": "Say hi.", "output": "Hi."}, {"id": "2", "instruction": "Count.", "output": "1 2 3"}]
    monkeypatch.setattr(transllm, "kd_for_stage3", lambda cfg: kd_rows)
    common = ["--tcot-translation", "self"]
    translated = []
    monkeypatch.setattr(build, "self_translator",
                        lambda *a, **k: lambda texts, src, tgt: translated.extend(texts) or [f"[{tgt}] {t}" for t in texts])

    def tcot_rows(data):
        return sum(1 for _ in open(data["tcot"][0][0], encoding="utf-8"))
    with_kd = transllm.transfer_data(parse_args(transllm.TransLLMConfig, argv(base, tmp_path / "a", *common)),
                                     model=torch.nn.Linear(1, 1))
    assert set(with_kd) == {"tcot", "recovery", "translation"} and tcot_rows(with_kd) == 4 + 2 and translated

    monkeypatch.setattr(transllm, "kd_for_stage3", lambda cfg: pytest.fail("KD answers were asked for"))
    translated.clear()
    without = transllm.transfer_data(parse_args(transllm.TransLLMConfig, argv(base, tmp_path / "b", *common,
                                                                             "--no-recovery-kd")),
                                     model=torch.nn.Linear(1, 1))
    assert set(without) == {"tcot", "translation"} and tcot_rows(without) == 4 and not translated


def test_tcot_chat_and_runner_pass_compile_to_their_decoder(monkeypatch):
    # scripts/chat.py --tcot --compile and eval.run --tcot --compile reach the one-token step
    # through these two; a dropped flag would decode eagerly without a word.
    import model.tcot as tcot_module
    seen = []

    class Recorder:
        def __init__(self, *args, compile=False, **kwargs):
            seen.append(compile)

    monkeypatch.setattr(tcot_module, "Runner", Recorder)
    template = type("T", (), {"tokenizer": None})()
    for compile_ in (True, False):
        TCOTChat(None, None, template, compile=compile_)
        TCOTRunner(None, None, template, compile=compile_)
    assert seen == [True, True, False, False]
