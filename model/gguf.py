"""Read GGUF files (llama.cpp's model format) with numpy, and turn a llama GGUF into HF tensors.

File layout (all integers little-endian; GGUF versions 2 and 3):

    magic          4 bytes  b"GGUF"
    version        uint32   2 or 3 (version 1 used 32-bit counts and is not read here)
    tensor_count   uint64
    kv_count       uint64
    kv_count x metadata entry:
        key        string   (a string is: uint64 byte length, then that many UTF-8 bytes)
        value_type uint32   one of _VALUE_TYPES below
        value               the value; an ARRAY is: uint32 element type, uint64 count,
                            then count elements (arrays of strings and nested arrays allowed)
    tensor_count x tensor info:
        name       string
        n_dims     uint32   at most 4
        ne         n_dims x uint64, ggml order: ne[0] is the fastest-varying (row length),
                            so the PyTorch shape is ne reversed
        type       uint32   ggml type id (F32, F16, Q8_0, ...; see _GGML_TYPES)
        offset     uint64   byte offset of the tensor's data, relative to the data section
    padding to a multiple of `general.alignment` (a uint32 metadata key; 32 when absent)
    data section: every tensor's bytes, each starting at an aligned offset.

Quantised types store fixed-size blocks of `block_size` consecutive elements along ne[0]:

    Q8_0: fp16 scale d, 32 x int8 q                     x = q * d
    Q4_0: fp16 scale d, 16 bytes of 4-bit q             x = (q - 8) * d
    Q4_1: fp16 scale d, fp16 minimum m, 16 bytes of q   x = q * d + m
    (in the 4-bit types byte j holds element j in its low nibble and element j + 16 in its high one)

`GGUFFile` maps the file with np.memmap and reads only the header when opened; tensor data is
read and dequantised to float32 one tensor at a time by `GGUFFile.tensor`. `llama_hf_config`
and `iter_hf_tensors` turn a llama-architecture file into an HF LlamaForCausalLM config and
HF-named tensors (undoing the q/k row permutation that llama.cpp's converter applies).
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS

# Metadata value types: id -> (name, struct format for scalars; None for STRING / ARRAY).
_VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
    4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"),
    8: ("STRING", None), 9: ("ARRAY", None),
    10: ("UINT64", "<Q"), 11: ("INT64", "<q"), 12: ("FLOAT64", "<d"),
}
_STRING, _ARRAY = 8, 9

# ggml tensor types: id -> (name, elements per block, bytes per block). All known types are
# listed, not only the ones we can dequantise, so that every tensor's byte extent can be checked
# against the file size when the file is opened.
_GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in the GGUF header.

    name: llama.cpp tensor name; ggml_type: type name ("F32", "Q4_1", ...);
    shape: PyTorch order (GGUF `ne` reversed); offset: absolute byte offset in the file;
    nbytes: size of its (possibly quantised) data in bytes.
    """
    name: str
    ggml_type: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class _Truncated(Exception):
    """Raised inside the header parser when a read runs past the end of the file."""


class _Cursor:
    """Sequential little-endian reader over a byte buffer (a memoryview of the memmap)."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        """The next n bytes; _Truncated if the buffer ends first."""
        if n < 0 or self.pos + n > len(self.buf):
            raise _Truncated(f"needs {n} bytes at byte {self.pos}, file has {len(self.buf)}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return str(self.take(self.scalar("<Q")), "utf-8")

    def value(self, vtype: int) -> Any:
        """One metadata value of type id vtype, as a python str / int / float / bool / list."""
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        if vtype not in _VALUE_TYPES:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos}")
        value = self.scalar(_VALUE_TYPES[vtype][1])
        # struct widens float32 to a python float exactly, so 1e-5 stays 9.999999747378752e-06,
        # the same value llama.cpp (and gguf-py) see.
        return value

    def array(self) -> list:
        etype, count = self.scalar("<I"), self.scalar("<Q")
        if etype in (_STRING, _ARRAY):
            # Variable-size elements: there is no way around reading them one by one.
            return [self.value(etype) for _ in range(count)]
        if etype not in _VALUE_TYPES:
            raise ValueError(f"unknown array element type {etype} at byte {self.pos}")
        # Fixed-size elements (e.g. 49k token types): one numpy read instead of a python loop.
        dtype = np.dtype(_VALUE_TYPES[etype][1])
        raw = self.take(count * dtype.itemsize)
        return np.frombuffer(raw, dtype=dtype, count=count).tolist()


def _align(n: int, alignment: int) -> int:
    """n rounded up to a multiple of alignment."""
    return (n + alignment - 1) // alignment * alignment


class GGUFFile:
    """A GGUF file opened for reading.

    GGUFFile(path) parses the header (metadata and tensor infos) and checks that every tensor's
    data lies inside the file; tensor data is only read by `tensor(name)`.
    Attributes: path (Path), version (int), metadata (dict key -> python value),
    tensors (dict name -> TensorInfo, in file order).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} not found")
        size = self.path.stat().st_size
        if size == 0:  # np.memmap refuses empty files with an unhelpful message
            raise ValueError(f"{self.path}: empty file, not a GGUF file")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            self._parse_header(_Cursor(memoryview(self._data)), size)
        # `from None`: one line naming the file and the fault; the parser's frames do not help.
        except _Truncated as err:
            raise ValueError(f"{self.path}: truncated GGUF header: {err}") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.path}: corrupt GGUF header: invalid UTF-8 string ({err.reason})") from None
        except ValueError as err:
            raise ValueError(f"{self.path}: {err}") from None

    def _parse_header(self, cur: _Cursor, size: int) -> None:
        magic = bytes(cur.take(4))
        if magic != GGUF_MAGIC:
            raise ValueError(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}: not a GGUF file")
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            # A big-endian file reads as version 0x03000000 here.
            raise ValueError(f"GGUF version {self.version} not supported (only 2 and 3, little-endian)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")

        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))

        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > _MAX_DIMS:
                raise ValueError(f"tensor {name} has {n_dims} dims (ggml allows {_MAX_DIMS})")
            ne = [cur.scalar("<Q") for _ in range(n_dims)]
            raw_infos.append((name, ne, cur.scalar("<I"), cur.scalar("<Q")))

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise ValueError(f"general.alignment is {alignment!r}, expected a positive integer")
        data_start = _align(cur.pos, alignment)

        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, type_id, rel_offset in raw_infos:
            self.tensors[name] = self._tensor_info(name, ne, type_id, data_start + rel_offset, size)

    def _tensor_info(self, name: str, ne: list[int], type_id: int, offset: int, size: int) -> TensorInfo:
        """Validate one tensor's type and extent against the file size; return its TensorInfo."""
        if type_id not in _GGML_TYPES:
            raise ValueError(f"tensor {name} has unknown ggml type id {type_id}")
        type_name, block, block_bytes = _GGML_TYPES[type_id]
        n = int(np.prod(ne, dtype=np.int64)) if ne else 1
        if ne and ne[0] % block:
            raise ValueError(f"tensor {name}: row length {ne[0]} not a multiple of the {type_name} block size {block}")
        nbytes = n // block * block_bytes
        if offset + nbytes > size:
            raise ValueError(f"file truncated: tensor {name} ({type_name}) needs bytes "
                             f"{offset}..{offset + nbytes}, file has {size}")
        return TensorInfo(name, type_name, tuple(reversed(ne)), offset, nbytes)

    def tensor(self, name: str) -> np.ndarray:
        """The named tensor dequantised to a new float32 array of shape info.shape (PyTorch order)."""
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        info = self.tensors[name]
        if info.ggml_type not in _DEQUANT:
            raise ValueError(f"{self.path}: tensor {name} has type {info.ggml_type}, which this reader "
                             f"cannot dequantise (supported: {', '.join(_DEQUANT)})")
        raw = self._data[info.offset:info.offset + info.nbytes]
        return _DEQUANT[info.ggml_type](raw).reshape(info.shape)

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, version={self.version}, {len(self.tensors)} tensors)"


# --- dequantisation: raw uint8 bytes (n_bytes,) -> float32 (n_elements,) ---------------------

def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    """(n_blocks, block_bytes) uint8 view of a quantised tensor's bytes."""
    return raw.reshape(-1, block_bytes)


def _f16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    """(n_blocks, 1) float32 from the fp16 stored at byte `start` of every block."""
    return blocks[:, start:start + 2].view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n_blocks, 16) packed bytes -> (n_blocks, 32) uint8 values: low nibbles first, then high."""
    q = np.empty((qs.shape[0], 2 * qs.shape[1]), dtype=np.uint8)
    q[:, :qs.shape[1]] = qs & 0x0F
    q[:, qs.shape[1]:] = qs >> 4
    return q


def _dequant_f32(raw: np.ndarray) -> np.ndarray:
    return raw.view("<f4").astype(np.float32)  # astype copies: the result must not pin the mmap


def _dequant_f16(raw: np.ndarray) -> np.ndarray:
    return raw.view("<f2").astype(np.float32)


def _dequant_bf16(raw: np.ndarray) -> np.ndarray:
    # bf16 is the top half of a float32: shift its bits into place.
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _dequant_q8_0(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, 34)
    out = blocks[:, 2:].view(np.int8).astype(np.float32)
    out *= _f16_field(blocks, 0)  # in place: the embedding table is the largest tensor
    return out.reshape(-1)


def _dequant_q4_0(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, 18)
    out = _nibbles(blocks[:, 2:]).astype(np.float32)
    out -= 8.0  # 4-bit values are stored offset by 8 so they can be unsigned
    out *= _f16_field(blocks, 0)
    return out.reshape(-1)


def _dequant_q4_1(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, 20)
    out = _nibbles(blocks[:, 4:]).astype(np.float32)
    out *= _f16_field(blocks, 0)
    out += _f16_field(blocks, 2)  # per-block minimum: Q4_1 is affine, Q4_0 symmetric
    return out.reshape(-1)


_DEQUANT = {
    "F32": _dequant_f32, "F16": _dequant_f16, "BF16": _dequant_bf16,
    "Q8_0": _dequant_q8_0, "Q4_0": _dequant_q4_0, "Q4_1": _dequant_q4_1,
}


# --- llama GGUF -> Hugging Face LlamaForCausalLM -------------------------------------------------

def _require_llama(metadata: Mapping[str, Any], source: str) -> None:
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")


def _required(metadata: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in metadata:
        raise ValueError(f"{source}: metadata key {key} missing")
    return metadata[key]


def _rope_scaling(metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """HF rope_scaling dict from llama.rope.scaling.* keys, or None when the file has none."""
    kind = metadata.get("llama.rope.scaling.type")
    factor = metadata.get("llama.rope.scaling.factor")
    if kind is None and factor is None or kind == "none":
        return None
    scaling: dict[str, Any] = {"rope_type": kind or "linear", "factor": float(factor if factor is not None else 1.0)}
    if "llama.rope.scaling.original_context_length" in metadata:
        scaling["original_max_position_embeddings"] = metadata["llama.rope.scaling.original_context_length"]
    if "llama.rope.scaling.attn_factor" in metadata:
        scaling["attention_factor"] = metadata["llama.rope.scaling.attn_factor"]
    return scaling


def llama_hf_config(source: GGUFFile | Mapping[str, Any], tensor_names: Iterable[str] | None = None) -> dict[str, Any]:
    """An HF config.json-style dict for LlamaForCausalLM from a llama GGUF's metadata.

    source: a GGUFFile, or its metadata dict together with tensor_names (the tensor names are
    needed because a tied model is recognised by having no output.weight).
    """
    if isinstance(source, GGUFFile):
        metadata, names, where = source.metadata, set(source.tensors), str(source.path)
    else:
        if tensor_names is None:
            raise TypeError("llama_hf_config(metadata) also needs tensor_names (to detect tied embeddings)")
        metadata, names, where = source, set(tensor_names), "GGUF metadata"
    _require_llama(metadata, where)
    get = lambda key: _required(metadata, "llama." + key, where)  # noqa: E731

    n_head = get("attention.head_count")
    hidden = get("embedding_length")
    if "llama.vocab_size" in metadata:
        vocab = metadata["llama.vocab_size"]
    else:
        vocab = len(_required(metadata, "tokenizer.ggml.tokens", where))
    # key_length is the true head size; rope.dimension_count is the rotary size, equal to it in llama.
    head_dim = metadata.get("llama.attention.key_length",
                            metadata.get("llama.rope.dimension_count", hidden // n_head))
    rope_scaling = _rope_scaling(metadata)
    if "rope_freqs.weight" in names and rope_scaling is None:
        # llama.cpp stores llama-3.1 rope scaling only as this per-frequency factor tensor; an HF
        # config without rope_scaling would silently run the model at the wrong frequencies.
        raise ValueError(f"{where}: has rope_freqs.weight (llama-3.1 style rope scaling) but no "
                         "llama.rope.scaling.* metadata to rebuild HF rope_scaling from")

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": metadata.get("llama.attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": float(metadata.get("llama.rope.freq_base", 10000.0)),  # llama.cpp's default
        "rope_scaling": rope_scaling,
        "max_position_embeddings": get("context_length"),
        "vocab_size": vocab,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    for gguf_key, hf_key in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        if f"tokenizer.ggml.{gguf_key}_token_id" in metadata:
            config[f"{hf_key}_token_id"] = metadata[f"tokenizer.ggml.{gguf_key}_token_id"]
    return config


_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors HF does not store: llama.cpp precomputes llama-3.1 rope frequency factors, which HF
# recomputes from config.rope_scaling (llama_hf_config refuses a file where it cannot).
_SKIPPED = {"rope_freqs.weight"}


def hf_name(name: str) -> str:
    """HF LlamaForCausalLM parameter name for a llama.cpp tensor name; ValueError if unknown."""
    top, _, kind = name.rpartition(".")
    if top in _TOP_LEVEL_NAMES and kind in ("weight", "bias"):
        return f"{_TOP_LEVEL_NAMES[top]}.{kind}"
    match = _BLOCK_RE.fullmatch(name)
    if match and match.group(2) in _BLOCK_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    raise ValueError(f"unknown llama GGUF tensor name {name!r}: no HF LlamaForCausalLM equivalent")


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. w: (n_head * head_dim, ...) -> same shape.

    HF's rotary embedding rotates the two halves of each head (rotate-half); llama.cpp rotates
    adjacent pairs. convert_hf_to_gguf therefore reorders each head's rows from
    [x0 .. x_{d/2-1}, y0 .. y_{d/2-1}] to [x0, y0, x1, y1, ...] via
    w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2); the inverse reads the pairs back out.
    """
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"cannot un-permute {w.shape[0]} rows into {n_head} heads of even size")
    head_dim = w.shape[0] // n_head
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_head, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape))


def iter_hf_tensors(gguf: GGUFFile) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 tensor) for every tensor of a llama GGUF, one at a time.

    Tensors are dequantised lazily so peak memory stays near one float32 copy of the model plus
    one tensor; q_proj / k_proj rows are un-permuted back to HF's rotate-half layout.
    """
    _require_llama(gguf.metadata, str(gguf.path))
    n_head = _required(gguf.metadata, "llama.attention.head_count", str(gguf.path))
    # k is permuted with the kv head count: with grouped-query attention it has fewer heads.
    n_kv_head = gguf.metadata.get("llama.attention.head_count_kv", n_head)
    for name in gguf.tensors:
        if name in _SKIPPED:
            continue
        try:
            target = hf_name(name)
        except ValueError as err:
            raise ValueError(f"{gguf.path}: {err}") from None
        w = gguf.tensor(name)
        module = target.split(".")[-2]
        if module == "q_proj":
            w = unpermute_rotary(w, n_head)
        elif module == "k_proj":
            w = unpermute_rotary(w, n_kv_head)
        yield target, torch.from_numpy(w)
