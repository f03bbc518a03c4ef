"""Evaluation: what moving a chat model into a new language gains and what it costs.

One job per file:
    langid.py           which language/script is a text in (Traditional vs Simplified Chinese too)
    bleu.py             corpus BLEU and chrF++ after sacrebleu's definitions
    refusal.py          refusal detection by the GCG keyword list (+ optional judge hook)
    common.py           JSONL data, batched token log-likelihoods, batched chat answering
    multiple_choice.py  MMLU-style exams by log-likelihood (acc, acc_norm, k-shot)
    perplexity.py       perplexity of text, plain or in the InsCP chat template
    alignment.py        share of answers in the prompt's language (InsCP Table 1)
    translation.py      PUD translation, BLEU/chrF++
    mtbench.py          two-turn MT-bench answers and judge-model grading
    report.py           results.json, report.md, hand-drawn SVG bar charts
    run.py              `python -m eval.run --model PATH ... --suite ... --out DIR`
"""
