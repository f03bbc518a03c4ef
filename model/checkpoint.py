"""Load a model + tokenizer from an HF folder or a GGUF file; save in HF format.

HF folders of Llama, Mistral and Qwen2 models load (model/config.py says which config keys are
honoured and which are refused); save() writes the family's own model_type and architecture, so
transformers loads the folder as LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM.

Loading builds the model on the meta device (no memory, no random init) and then fills it one
tensor at a time from safetensors' memory map (or the GGUF dequantiser), so peak memory stays
near one copy of the weights. Saving writes an HF folder (config.json, safetensors shards with an
index above `max_shard_bytes`, tokenizer files) that loads back here and in transformers; it is
written to a temporary folder and renamed into place, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import quantize as quantize_lib
from model.config import LlamaConfig
from model.gguf import GGUFFile, iter_hf_tensors, llama_hf_config
from model.llama import Llama
from model.lora import LoRAConfig, apply_lora, merge_lora, save_adapter
from model.quantize_int4 import quantize_int4
from model.gguf_tokenizer import tokenizer_from_gguf
from model.tokenizer import load_tokenizer

# Tensors some checkpoints carry that the model recomputes instead of storing.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
         attention: str | None = None, tokenizer: bool = True, quantize: str | None = None):
    """path: an HF folder or a .gguf file -> (Llama in eval mode, Tokenizer or None).

    dtype: None keeps the stored dtype (float32 for GGUF, whose quantised weights are dequantised).
    attention: sdpa | eager | triton (default: the config's, sdpa).
    tokenizer: False loads the weights alone (intermediate checkpoints often have no tokenizer
    files) and returns None for it; True refuses a folder without them, naming the files.
    quantize: "int8" turns every linear layer into int8 weights (model/quantize.py) as its tensor
    is read, so no float copy of the whole model is made; GGUF Q8_0 weights go from their
    blocks to int8 directly. "int4": groups of 32 (GGUF Q4_1's layout; model/quantize_int4.py),
    CPU only, quantised after the float model is built.
    The config is checked (and refused in one line) before the tokenizer or any tensor is read.
    """
    if quantize not in (None, "int8", "int4"):
        raise ValueError(f"quantize={quantize!r}: only 'int8' and 'int4' are implemented")
    if quantize == "int4" and torch.device(device).type != "cpu":
        raise ValueError(f"quantize='int4' on {device}: int4 is implemented for CPU decoding only (use int8)")
    path = _existing(path)
    if path.suffix == ".gguf":
        gguf = GGUFFile(path)
        config = LlamaConfig.from_hf(llama_hf_config(gguf), source=str(path))
        tensors = quantize_lib.gguf_tensors_int8(gguf, config) if quantize == "int8" else iter_hf_tensors(gguf)
    else:
        config = LlamaConfig.from_hf(_read_json(path / "config.json"), source=str(path / "config.json"))
        tensors = _iter_safetensors(path)
    if attention:
        config.attention = attention
    tok = load_tokenizer_only(path) if tokenizer else None
    model = _build(config, tensors, dtype, torch.device(device), str(path), quantize if quantize == "int8" else None)
    if quantize == "int4":
        quantize_int4(model)
    return model.eval(), tok


def load_tokenizer_only(path: str | os.PathLike):
    """The tokenizer (with its stored Jinja chat_template) of an HF folder or .gguf file, without
    building the model: enough to tokenise a corpus."""
    path = _existing(path)
    if path.suffix == ".gguf":
        metadata = GGUFFile(path).metadata
        tokenizer = tokenizer_from_gguf(metadata)
        tokenizer.chat_template = metadata.get("tokenizer.chat_template")
    else:
        tokenizer = load_tokenizer(path)  # reads chat_template.jinja / tokenizer_config.json itself
    return tokenizer


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if not (path.is_dir() or path.suffix == ".gguf"):
        raise ValueError(f"{path}: expected an HF model folder or a .gguf file")
    return path


def _read_json(file: Path) -> dict:
    if not file.exists():
        raise FileNotFoundError(f"{file} not found (an HF model folder needs config.json)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None


def _iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from model.safetensors or the shards named by its index."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    for name in files:
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} listed in the index but missing")
        with safe_open(folder / name, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _build(config: LlamaConfig, tensors, dtype, device: torch.device, source: str, quantize: str | None = None) -> Llama:
    with torch.device("meta"):
        model = Llama(config)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    for name, tensor in tensors:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name not in params:
            raise ValueError(f"{source}: unknown tensor {name!r} (not part of a LLaMA model)")
        expected = tuple(params[name].shape)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                             f"the config implies {expected}")
        if quantize and (quantize_lib.is_quantized_weight(name) or
                         name == "model.embed_tokens.weight" and config.tie_embeddings):
            quantize_lib.load_int8_tensor(model, name, tensor, device)
        else:
            # copy=True: a fresh, aligned allocation. Views into a file buffer or numpy array can
            # sit at 16-byte offsets, which halves CPU matmul speed.
            _set_param(model, name, tensor.to(device=device, dtype=dtype or tensor.dtype, copy=True))
        loaded.add(name)
    if config.tie_embeddings and quantize:
        quantize_lib.tie_int8_embedding(model, dtype or torch.float32)
        loaded |= {"model.embed_tokens.weight", "lm_head.weight"}
    elif config.tie_embeddings:
        # One matrix serves both: whichever name the file stored it under fills both.
        shared = model.model.embed_tokens.weight if "model.embed_tokens.weight" in loaded else model.lm_head.weight
        model.model.embed_tokens.weight = model.lm_head.weight = shared
        loaded |= {"model.embed_tokens.weight", "lm_head.weight"}
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return model


def _set_param(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(value, requires_grad=getattr(module, attr).requires_grad))


def state_dict_for_save(model: Llama) -> dict[str, torch.Tensor]:
    """HF-named tensors, contiguous, with the tied head stored once (as HF does)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save(model: Llama, tokenizer, folder: str | os.PathLike, max_shard_bytes: int = 5 * 2**30,
         dtype: torch.dtype | None = None) -> Path:
    """Write an HF folder: config.json, generation_config.json, model(-0000k-of-0000n).safetensors
    (+ index when sharded), tokenizer files. Atomic: built beside `folder`, then renamed."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        state = state_dict_for_save(model)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        _write_shards(state, tmp, max_shard_bytes)
        config = model.config.to_hf()
        config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")  # transformers 5's name
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {"bos_token_id": model.config.bos_id, "eos_token_id": model.config.eos_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
            _store_chat_template(tmp, getattr(tokenizer, "chat_template", None))
        _replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _replace_folder(new: Path, folder: Path) -> None:
    """Move `new` to `folder`; an old `folder` is moved aside first and deleted only after, so
    at every instant one complete checkpoint exists under a known name."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(new, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _store_chat_template(folder: Path, jinja: str | None) -> None:
    """Keep the model's own Jinja chat template in tokenizer_config.json (transformers reads it
    there; we read the default system prompt from it)."""
    if not jinja:
        return
    file = folder / "tokenizer_config.json"
    config = json.loads(file.read_text()) if file.exists() else {}
    config["chat_template"] = jinja
    file.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ---- export of a trained model ----------------------------------------------------------------
def model_from_state(state: dict[str, torch.Tensor], config: LlamaConfig, lora: LoRAConfig | None = None) -> Llama:
    """A fresh, unsharded Llama (with the LoRA layout `lora` describes) holding `state`: the full
    state dict of a trained model, HF names (LoRA tensors at `<layer>.lora_A/lora_B`). The
    tensors are cloned, so merging LoRA into the result never writes into the caller's (with one
    process they can share storage with the live training parameters). A missing or unexpected
    tensor is refused, naming the first few."""
    with torch.device("meta"):
        model = Llama(config)
    if lora:
        apply_lora(model, list(lora.targets), lora.r, lora.alpha, lora.dropout, list(lora.trainable_modules))
    missing, unexpected = model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"export: state dict mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def export_trained(state: dict[str, torch.Tensor], config: LlamaConfig, tokenizer, final: str | os.PathLike,
                   lora: LoRAConfig | None = None, adapter: str | os.PathLike | None = None) -> dict[str, str]:
    """Write a trained model's full state dict as an HF folder `final` (LoRA merged into the base
    weights: a plain model transformers loads) and, with `lora`, the adapter alone in PEFT's
    layout into `adapter` first. -> {"final": path, "adapter": path (with lora)}."""
    model = model_from_state(state, config, lora)
    written = {}
    if lora:
        if adapter is None:
            raise ValueError("export_trained: a LoRA model needs an adapter folder")
        written["adapter"] = str(save_adapter(model, lora, adapter))
        merge_lora(model)
    written["final"] = str(save(model, tokenizer, final))
    return written
