"""Data: text files -> formats (InsCP / orgCP / chat SFT / TCOT / recovery KD / translation)
-> token files -> packed blocks -> distributed, resumable batches.

readers.py   .txt / .jsonl -> texts and conversations (errors name file:line)
formats.py   record -> (ids, loss_mask) in one training format
filter.py    perplexity filter (InsCP keeps PPL <= 15)
tokenfile.py samples -> memmapped token file (tokens, loss mask, document offsets, meta)
packing.py   token stream -> fixed-length blocks with per-document segments and positions
loader.py    PackedDataset, BatchLoader (deterministic across ranks, step-indexed resume)
prepare.py   the pipeline as one function and CLI: python -m data.prepare
samples/     a small original Traditional Chinese sample for the demo run
"""
