"""Export a LLaMA model and its tokenizer as a GGUF file that llama.cpp / ollama / LM Studio run.

    python -m model.export_gguf runs/inscp/final out.gguf --type q8_0      # or --type f16
    llama-cli -m out.gguf -cnv                                             # chat with it

The file has llama.cpp's own layout, as its convert_hf_to_gguf.py writes it for LlamaForCausalLM
(and MistralForCausalLM, which llama.cpp also runs as architecture llama):

- metadata: general.architecture "llama", llama.* hyper-parameters (context_length,
  embedding_length, block_count, feed_forward_length, attention.head_count(_kv),
  layer_norm_rms_epsilon, rope.freq_base, rope.dimension_count, key_length / value_length when
  the head size is not dim / heads, vocab_size), linear rope scaling as llama.rope.scaling.*,
  and the tokenizer (model/gguf_tokenizer.py) with its chat template;
- tensors: blk.N.attn_q.weight etc.; q / k rows permuted to llama.cpp's interleaved rotary order;
  output.weight omitted when the embeddings are tied; norms and other 1-D tensors F32;
  matrices F16 or Q8_0 (a matrix whose rows are not a multiple of 32 stays F16, as in llama.cpp);
  llama3 rope scaling (Llama 3.1) as the rope_freqs.weight tensor of per-pair factors, which is
  the only form llama.cpp reads it in.

Refused in one line, before a file is created: biases on projections (Qwen2: llama.cpp's qwen2
architecture), dynamic / yarn rope scaling, tokenizers without a GGUF form (see
model/gguf_tokenizer.py). Loading the file back with model.checkpoint.load gives the same model up
to the weights' rounding to F16 / Q8_0 (tests/test_export_gguf.py).
"""
from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import load, state_dict_for_save
from model.gguf import (GGUFFile, OutTensor, gguf_name, llama3_rope_factors, permute_rotary, quantize_q8_0,
                        write_gguf)
from model.gguf_tokenizer import gguf_tokenizer_metadata

TYPES = ("f16", "q8_0")
_FILE_TYPE = {"f16": 1, "q8_0": 7}  # llama_ftype: LLAMA_FTYPE_MOSTLY_F16, LLAMA_FTYPE_MOSTLY_Q8_0
_QUANT_VERSION = 2  # GGML_QNT_VERSION: the block layouts of model/gguf.py


def export_gguf(model, tokenizer, path: str | os.PathLike, type: str = "f16", name: str | None = None) -> Path:
    """Write `model` (model.llama.Llama) and `tokenizer` to `path` as a llama GGUF.

    type: "f16" or "q8_0" for the matrices (1-D tensors are always F32). name: general.name
    (default: the file's stem). Returns the path. ValueError (one line) for anything the GGUF
    layout cannot represent exactly, before the file is created.
    """
    if type not in TYPES:
        raise ValueError(f"GGUF export type {type!r} not supported (choose {', '.join(TYPES)})")
    path = Path(path)
    config = model.config
    _check_exportable(config, path)
    metadata = ([("general.architecture", "STRING", "llama"),
                 ("general.name", "STRING", name or path.stem),
                 ("general.file_type", "UINT32", _FILE_TYPE[type]),
                 ("general.quantization_version", "UINT32", _QUANT_VERSION)]
                + _llama_metadata(config)
                + gguf_tokenizer_metadata(tokenizer, config.vocab_size))
    tensors = _rope_tensors(config) + [_out_tensor(n, w, type, config) for n, w in state_dict_for_save(model).items()]
    return write_gguf(path, metadata, tensors)


def _check_exportable(config, path: Path) -> None:
    """Refuse (one line) a model llama.cpp's llama architecture would run differently."""
    if config.proj_bias:  # Qwen2: llama.cpp runs it as architecture qwen2, not written here
        raise ValueError(f"{path}: {config.family} model with biases on {', '.join(config.proj_bias)}: "
                         "GGUF export writes the llama architecture only")
    if _rope_kind(config) not in ("default", "linear", "llama3"):
        raise ValueError(f"{path}: rope scaling {_rope_kind(config)!r} has no llama.cpp llama form here "
                         "(exported: default, linear, llama3)")


def _llama_metadata(config) -> list[tuple[str, str, object]]:
    """llama.* keys, typed as llama.cpp reads them (uint32 counts, float32 reals)."""
    entries = [("llama.vocab_size", "UINT32", config.vocab_size),
               ("llama.context_length", "UINT32", config.max_seq_len),
               ("llama.embedding_length", "UINT32", config.dim),
               ("llama.block_count", "UINT32", config.n_layers),
               ("llama.feed_forward_length", "UINT32", config.ffn_dim),
               ("llama.attention.head_count", "UINT32", config.n_heads),
               ("llama.attention.head_count_kv", "UINT32", config.n_kv_heads),
               ("llama.rope.freq_base", "FLOAT32", float(config.rope_theta)),
               ("llama.attention.layer_norm_rms_epsilon", "FLOAT32", float(config.norm_eps)),
               ("llama.rope.dimension_count", "UINT32", config.head_dim)]
    if config.head_dim != config.dim // config.n_heads:
        # llama.cpp assumes dim / heads otherwise (and so does our reader)
        entries += [("llama.attention.key_length", "UINT32", config.head_dim),
                    ("llama.attention.value_length", "UINT32", config.head_dim)]
    if _rope_kind(config) == "linear":
        entries += [("llama.rope.scaling.type", "STRING", "linear"),
                    ("llama.rope.scaling.factor", "FLOAT32", float(config.rope_scaling["factor"]))]
    return entries


def _rope_kind(config) -> str:
    return (config.rope_scaling or {}).get("rope_type", "default")


def _rope_tensors(config) -> list[OutTensor]:
    """[rope_freqs.weight] for llama3 rope scaling (what llama.cpp's converter writes), else []."""
    if _rope_kind(config) != "llama3":
        return []
    factors = llama3_rope_factors(config.head_dim, config.rope_theta, config.rope_scaling)
    return [OutTensor("rope_freqs.weight", "F32", factors.shape, lambda: factors)]


def _out_tensor(name: str, weight: torch.Tensor, type: str, config) -> OutTensor:
    """One HF-named parameter as the GGUF tensor llama.cpp expects (converted lazily)."""
    target = gguf_name(name)
    kind = "F32"
    if weight.dim() >= 2:
        kind = "Q8_0" if type == "q8_0" and weight.shape[-1] % 32 == 0 else "F16"
    heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}.get(target.split(".")[-2])

    def data() -> np.ndarray:
        w = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
        if heads:
            w = permute_rotary(w, heads)
        if kind == "Q8_0":
            return quantize_q8_0(w)
        return w.astype(np.float16 if kind == "F16" else np.float32)

    return OutTensor(target, kind, tuple(weight.shape), data)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an HF model folder (e.g. RUN/final) or a .gguf file")
    parser.add_argument("out", help="the .gguf file to write")
    parser.add_argument("--type", choices=TYPES, default="f16", help="matrix type (default f16)")
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load(args.model, dtype=torch.float32)
        out = export_gguf(model, tokenizer, args.out, args.type)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    types = Counter(info.ggml_type for info in GGUFFile(out).tensors.values())
    print(f"wrote {out}: {sum(types.values())} tensors ({', '.join(f'{k} {v}' for k, v in types.items())}), "
          f"{out.stat().st_size / 2**20:.1f} MiB")
    return out


if __name__ == "__main__":
    main()
