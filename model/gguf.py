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

Quantised types store fixed-size blocks of `block_size` consecutive elements along ne[0]. The
types dequantised here, each block's bytes in order (d, m: fp16; "q[k]: b-bit" = k packed values):

    type    elems bytes  block layout                                          element x
    Q8_0     32    34    d, q[32] int8                                         q * d
    Q4_0     32    18    d, qs[16]: 4-bit                                      (q - 8) * d
    Q4_1     32    20    d, m, qs[16]: 4-bit                                   q * d + m
    Q5_0     32    22    d, qh uint32 (bit j: 5th bit of element j), qs[16]    (q - 16) * d
    Q5_1     32    24    d, m, qh uint32, qs[16]                               q * d + m
    IQ4_NL   32    18    d, qs[16]: 4-bit index into a fixed non-uniform grid  grid[q] * d
                         (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
    (4-bit qs of the 32-element types: byte j holds element j in its low nibble, j + 16 in its high)

    K-quants: 256-element super-blocks made of sub-blocks, each with its own scale (and min),
    themselves quantised against the super-block's fp16 d (and dmin):
    Q2_K    256    84    scales[16] (per 16 elements: low nibble scale, high nibble min),
                         qs[64]: 2-bit, d, dmin                                d*sc * q - dmin*m
    Q3_K    256   110    hmask[32] (high bit; clear = subtract 4), qs[64]: 2-bit,
                         scales[12]: 16 x 6-bit signed (offset 32), d          d*sc * q
    Q4_K    256   144    d, dmin, scales[12]: 8 x (6-bit scale, 6-bit min), qs[128]: 4-bit
                         (per 32 elements)                                     d*sc * q - dmin*m
    Q5_K    256   176    d, dmin, scales[12] as Q4_K, qh[32] (5th bit), qs[128] d*sc * q - dmin*m
    Q6_K    256   210    ql[128] (low 4 bits), qh[64] (top 2 bits), scales[16] int8 (per 16
                         elements), d                                          d*sc * (q - 32)
    (the exact bit positions are spelled out beside each _dequant_* function below)

Everything else (IQ1..IQ3, IQ4_XS, TQ*, MXFP4, ...) is refused when a file is opened for loading,
naming the tensor and its type, before any tensor is read.

`GGUFFile` maps the file with np.memmap and reads only the header when opened; tensor data is
read and dequantised to float32 one tensor at a time by `GGUFFile.tensor`. `llama_hf_config`
and `iter_hf_tensors` turn a llama-architecture file into an HF LlamaForCausalLM config and
HF-named tensors (undoing the q/k row permutation that llama.cpp's converter applies, and
rebuilding llama-3.1 rope scaling from llama.cpp's rope_freqs tensor).
"""
from __future__ import annotations

import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

from model.config import LlamaConfig
from model.llama import rope_inv_freq

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
_U64 = struct.Struct("<Q")

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

    def strings(self, count: int) -> list[str]:
        """count strings in a row (49k tokens, 49k merges): the same reads as `string`, inlined,
        because this loop is most of the time spent opening a file."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack = _U64.unpack_from
        for _ in range(count):
            if pos + 8 > end or pos + 8 + (n := unpack(buf, pos)[0]) > end:
                self.pos = pos
                raise _Truncated(f"string at byte {pos} runs past the end of the file ({end} bytes)")
            out.append(str(buf[pos + 8:pos + 8 + n], "utf-8"))
            pos += 8 + n
        self.pos = pos
        return out

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
        if etype == _STRING:
            return self.strings(count)
        if etype == _ARRAY:
            # Variable-size elements: there is no way around reading them one by one.
            return [self.array() for _ in range(count)]
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
        self.check_supported(info)
        raw = self._data[info.offset:info.offset + info.nbytes]
        return _DEQUANT[info.ggml_type](raw).reshape(info.shape)

    def check_supported(self, *infos: TensorInfo) -> None:
        """Refuse, in one line naming the file, tensor and type, the first of `infos` (default:
        every tensor) that this reader cannot dequantise. Reads no tensor data."""
        for info in infos or self.tensors.values():
            if info.ggml_type not in _DEQUANT:
                raise ValueError(f"{self.path}: tensor {info.name} has type {info.ggml_type}, which this reader "
                                 f"cannot dequantise (supported: {', '.join(_DEQUANT)})")

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, version={self.version}, {len(self.tensors)} tensors)"


# --- writing ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutTensor:
    """One tensor to write. shape: PyTorch order; data: called once, while the file is written,
    returning the tensor's bytes in ggml_type's layout (so only one tensor is in memory at once)."""
    name: str
    ggml_type: str
    shape: tuple[int, ...]
    data: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        _, block, block_bytes = _GGML_TYPES[_GGML_TYPE_IDS[self.ggml_type]]
        return int(np.prod(self.shape, dtype=np.int64)) // block * block_bytes


_VALUE_TYPE_IDS = {name: i for i, (name, _) in _VALUE_TYPES.items()}
_GGML_TYPE_IDS = {name: i for i, (name, _, _) in _GGML_TYPES.items()}


def _encode_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _encode_value(vtype: str, value: Any) -> bytes:
    """A metadata value of type vtype ("UINT32", "STRING", "ARRAY:INT32", ...), without its type id."""
    if vtype.startswith("ARRAY:"):
        element = vtype[len("ARRAY:"):]
        head = struct.pack("<IQ", _VALUE_TYPE_IDS[element], len(value))
        if element == "STRING":
            return head + b"".join(_encode_string(v) for v in value)
        return head + np.asarray(value, dtype=_VALUE_TYPES[_VALUE_TYPE_IDS[element]][1]).tobytes()
    if vtype == "STRING":
        return _encode_string(value)
    return struct.pack(_VALUE_TYPES[_VALUE_TYPE_IDS[vtype]][1], value)


def _header(metadata: list[tuple[str, str, Any]], tensors: list[OutTensor]) -> bytes:
    out = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, vtype, value in metadata:
        type_id = _ARRAY if vtype.startswith("ARRAY:") else _VALUE_TYPE_IDS[vtype]
        out += [_encode_string(key), struct.pack("<I", type_id), _encode_value(vtype, value)]
    offset = 0
    for t in tensors:
        ne = tuple(reversed(t.shape))
        out += [_encode_string(t.name), struct.pack(f"<I{len(ne)}Q", len(ne), *ne),
                struct.pack("<IQ", _GGML_TYPE_IDS[t.ggml_type], offset)]
        offset += _align(t.nbytes, DEFAULT_ALIGNMENT)
    return b"".join(out)


def write_gguf(path: str | Path, metadata: list[tuple[str, str, Any]], tensors: list[OutTensor]) -> Path:
    """Write a GGUF v3 file (alignment 32): metadata [(key, value type, value)], then tensors.

    Written to a temporary file beside `path` and renamed into place, so an interrupted export
    never leaves a truncated file under the final name.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            header = _header(metadata, tensors)
            f.write(header + bytes(_align(len(header), DEFAULT_ALIGNMENT) - len(header)))
            for t in tensors:
                data = np.ascontiguousarray(t.data()).view(np.uint8).reshape(-1)
                if data.nbytes != t.nbytes:
                    raise ValueError(f"{path}: tensor {t.name} ({t.ggml_type}, shape {t.shape}) produced "
                                     f"{data.nbytes} bytes, expected {t.nbytes}")
                f.write(memoryview(data))
                f.write(bytes(_align(t.nbytes, DEFAULT_ALIGNMENT) - t.nbytes))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- dequantisation: raw uint8 bytes (n_bytes,) -> float32 (n_elements,) ---------------------
# Every function works on all blocks at once (numpy broadcasting, no python loop over blocks) and
# multiplies in the same order as ggml's reference dequantize_row_* (and gguf-py), so results are
# equal bit for bit: fp32 products d * sc are formed first, then (d * sc) * q - (dmin * m).

def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    """(n_blocks, block_bytes) uint8 view of a quantised tensor's bytes."""
    return raw.reshape(-1, block_bytes)


def _f16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    """(n_blocks, 1) float32 from the fp16 stored at byte `start` of every block."""
    return blocks[:, start:start + 2].view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., k) packed bytes -> (..., 2k) uint8: the k low nibbles, then the k high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bit_planes(bits: np.ndarray, n_planes: int, width: int = 1) -> np.ndarray:
    """(..., k) bytes -> (..., n_planes, k) uint8: plane p holds bits [p*width, (p+1)*width) of
    every byte (the K-quants spread an element's high bits over bit planes of a shared array)."""
    if width == 1:  # unpackbits is one C loop; shifting a short last axis is slow in numpy
        planes = np.unpackbits(bits[..., None], axis=-1, bitorder="little")
        return np.swapaxes(planes, -1, -2)
    shifts = (np.arange(n_planes, dtype=np.uint8) * width)[:, None]
    return (bits[..., None, :] >> shifts) & ((1 << width) - 1)


def _qh_bits(blocks: np.ndarray, start: int) -> np.ndarray:
    """(n_blocks, 32) uint8: bit j of the little-endian uint32 at byte `start` (Q5_0 / Q5_1)."""
    return np.unpackbits(blocks[:, start:start + 4], axis=1, bitorder="little")


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


def _dequant_q5_0(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, 22)
    q = _nibbles(blocks[:, 6:]) | (_qh_bits(blocks, 2) << 4)
    out = q.astype(np.float32)
    out -= 16.0  # 5-bit values offset by 16
    out *= _f16_field(blocks, 0)
    return out.reshape(-1)


def _dequant_q5_1(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, 24)
    out = (_nibbles(blocks[:, 8:]) | (_qh_bits(blocks, 4) << 4)).astype(np.float32)
    out *= _f16_field(blocks, 0)
    out += _f16_field(blocks, 2)
    return out.reshape(-1)


def _dequant_iq4_nl(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, 18)
    # A non-uniform 4-bit grid (denser near zero, where weights are): index -> int8 level.
    out = _IQ4_NL_LEVELS[_nibbles(blocks[:, 2:])]
    out *= _f16_field(blocks, 0)
    return out.reshape(-1)


_IQ4_NL_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                          dtype=np.float32)


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes per block -> (scales, mins), each (n_blocks, 8) float32 of 6 bits.

    bytes 0-3: scale j (j < 4) in the low 6 bits, top 2 bits of scale j + 4;
    bytes 4-7: min j in the low 6 bits, top 2 bits of min j + 4;
    bytes 8-11: low nibble = low 4 bits of scale j + 4, high nibble = low 4 bits of min j + 4.
    """
    sc_lo, m_lo, mixed = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([sc_lo & 0x3F, (mixed & 0x0F) | ((sc_lo >> 6) << 4)], axis=1)
    mins = np.concatenate([m_lo & 0x3F, (mixed >> 4) | ((m_lo >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _affine_subblocks(q: np.ndarray, d: np.ndarray, scales: np.ndarray, dmin: np.ndarray,
                      mins: np.ndarray) -> np.ndarray:
    """q (n_blocks, n_sub, sub_len) -> (d * scale) * q - (dmin * min), per sub-block, flattened."""
    out = q.astype(np.float32)
    out *= (d * scales)[:, :, None]
    out -= (dmin * mins)[:, :, None]
    return out.reshape(-1)


def _dequant_q2_k(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, 84)
    packed = blocks[:, 0:16]  # per 16-element sub-block: scale in the low nibble, min in the high
    # qs: two halves of 32 bytes; bit pair p of byte l is element half * 128 + p * 32 + l.
    q = _bit_planes(blocks[:, 16:80].reshape(-1, 2, 32), 4, width=2).reshape(-1, 16, 16)
    return _affine_subblocks(q, _f16_field(blocks, 80), (packed & 0x0F).astype(np.float32),
                             _f16_field(blocks, 82), (packed >> 4).astype(np.float32))


def _dequant_q3_k(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, 110)
    # hmask: bit p of byte l is the high bit of element p * 32 + l; a CLEAR bit means "minus 4".
    high = _bit_planes(blocks[:, 0:32], 8).reshape(-1, 256)
    low = _bit_planes(blocks[:, 32:96].reshape(-1, 2, 32), 4, width=2).reshape(-1, 256)
    q = low.astype(np.int8) - ((high ^ 1) << 2).astype(np.int8)
    packed = blocks[:, 96:108]
    # 16 signed 6-bit scales (offset 32): low 4 bits as nibbles of bytes 0-7 (low nibbles for
    # scales 0-7, high for 8-15), top 2 bits as bit pairs of bytes 8-11 (pair p: scales 4p..4p+3).
    low4 = _nibbles(packed[:, 0:8])
    top2 = _bit_planes(packed[:, 8:12], 4, width=2).reshape(-1, 16)
    scales = ((low4 | (top2 << 4)).astype(np.int8) - 32).astype(np.float32)
    out = q.reshape(-1, 16, 16).astype(np.float32)
    out *= (_f16_field(blocks, 108) * scales)[:, :, None]
    return out.reshape(-1)


def _dequant_q4_k(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, 144)
    scales, mins = _k_scale_min(blocks[:, 4:16])
    # 4 chunks of 32 bytes: sub-block 2c is chunk c's low nibbles, sub-block 2c + 1 its high ones.
    q = _nibbles(blocks[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return _affine_subblocks(q, _f16_field(blocks, 0), scales, _f16_field(blocks, 2), mins)


def _dequant_q5_k(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, 176)
    scales, mins = _k_scale_min(blocks[:, 4:16])
    low = _nibbles(blocks[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    high = _bit_planes(blocks[:, 16:48], 8)  # bit j of qh byte l: 5th bit of element j * 32 + l
    return _affine_subblocks(low | (high << 4), _f16_field(blocks, 0), scales, _f16_field(blocks, 2), mins)


def _dequant_q6_k(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, 210)
    # Two halves of 128 elements. ql (64 bytes per half): byte p holds element p's low 4 bits in
    # its low nibble and element p + 64's in its high one; qh (32 bytes per half): bit pair s of
    # byte l holds the top 2 bits of element s * 32 + l.
    low = _nibbles(blocks[:, 0:128].reshape(-1, 2, 64))
    high = _bit_planes(blocks[:, 128:192].reshape(-1, 2, 32), 4, width=2).reshape(-1, 2, 128)
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(-1, 16, 16)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)  # signed, one per 16 elements
    out = q.astype(np.float32)
    out *= (_f16_field(blocks, 208) * scales)[:, :, None]
    return out.reshape(-1)


_DEQUANT = {
    "F32": _dequant_f32, "F16": _dequant_f16, "BF16": _dequant_bf16,
    "Q8_0": _dequant_q8_0, "Q4_0": _dequant_q4_0, "Q4_1": _dequant_q4_1,
    "Q5_0": _dequant_q5_0, "Q5_1": _dequant_q5_1, "IQ4_NL": _dequant_iq4_nl,
    "Q2_K": _dequant_q2_k, "Q3_K": _dequant_q3_k, "Q4_K": _dequant_q4_k,
    "Q5_K": _dequant_q5_k, "Q6_K": _dequant_q6_k,
}


# --- quantisation (export): float32 -> raw bytes, as ggml's reference quantize_row_*_ref ------

def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C roundf (ties away from zero; numpy's round is ties-to-even), exact in float32."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.copysign(whole + (a - whole >= 0.5), x)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float32 (..., n) with n % 32 == 0 -> Q8_0 bytes (n_elements // 32 * 34,) uint8.

    Per 32 elements: d = max|x| / 127 stored as fp16, q = roundf(x / d) with the fp32 reciprocal
    of the unrounded d (so the largest element maps to +-127), as ggml's quantize_row_q8_0_ref.
    """
    blocks = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    inverse = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inverse, where=d != 0)  # all-zero block: d = 0, q = 0
    out = np.empty((blocks.shape[0], 34), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8)
    out[:, 2:] = _round_half_away(blocks * inverse).astype(np.int8).view(np.uint8)
    return out.reshape(-1)


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


# --- llama-3.1 rope scaling: llama.cpp's rope_freqs tensor <-> HF rope_scaling -----------------
# llama.cpp's converter writes no rope-scaling metadata for rope_type llama3; it stores one factor
# per rotary pair in rope_freqs.weight (F32, head_dim / 2) and divides each pair's angle by it.
# HF instead keeps four numbers and recomputes the frequencies: _llama3_candidates infers them, and
# a candidate is kept only if our model's frequencies from it reproduce the tensor, so a file is
# run exactly or refused.
_ROPE_FREQS_RTOL = 1e-5  # both sides are fp32 computations of the same number: a few ulps apart


def llama3_rope_factors(head_dim: int, theta: float, rope_scaling: Mapping[str, Any] | None) -> np.ndarray:
    """(head_dim // 2,) float32: how many times slower each rotary pair turns under rope_scaling
    than plain rope; llama.cpp's rope_freqs.weight. Computed from model.llama.rope_inv_freq."""
    config = LlamaConfig(dim=head_dim, n_heads=1, head_dim=head_dim, rope_theta=theta,
                         rope_scaling=dict(rope_scaling) if rope_scaling else None)
    plain = rope_inv_freq(config.replace(rope_scaling=None))
    return (plain / rope_inv_freq(config)).numpy().astype(np.float32)


def _significant(x: float, digits: int = 6) -> float:
    """x rounded to `digits` significant digits: fitted fp32 values back to the config's own."""
    return float(f"{x:.{digits}g}")


def _llama3(factor: float, low: float, high: float, old_ctx: int) -> dict[str, Any]:
    return {"rope_type": "llama3", "factor": _significant(factor), "low_freq_factor": _significant(low),
            "high_freq_factor": _significant(high), "original_max_position_embeddings": int(old_ctx)}


def _llama3_candidates(factors: np.ndarray, head_dim: int, theta: float, old_ctx: int | None) -> Iterator[dict]:
    """HF llama3 dicts that may have produced rope_freqs, most likely first (each is verified).

    Pairs with f = 1 turn at full speed (wavelength below original context / high_freq_factor),
    pairs with f = F (the largest) F times slower (above original context / low_freq_factor);
    in between llama3 interpolates 1 / f = 1 / F + s (1 - 1 / F) with
    s = (old_ctx / wavelen - low) / (high - low), affine in 1 / wavelen. Only the ratios of
    old_ctx, low and high matter, so without an original context in the metadata low = 1
    (Meta's choice) fixes the scale.
    """
    big = float(factors.max())
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    medium = (factors > 1 + 1e-4) & (factors < big * (1 - 1e-4))
    s = (1 / factors[medium].astype(np.float64) - 1 / big) / (1 - 1 / big)
    # 1. Meta's values for every released Llama 3.1 / 3.2 / 3.3.
    yield _llama3(big, 1.0, 4.0, old_ctx or 8192)
    # 2. Two or more interpolated pairs: fit the line s = a / wavelen + b, a = old / (high - low),
    #    b = -low / (high - low).
    if medium.sum() >= 2:
        a, b = np.polyfit(1 / wavelen[medium], s, 1)
        if a > 0 and b < 0:
            old = old_ctx or round(-a / b)
            low = -b * old / a
            yield _llama3(big, low, low + old / a, old)
    # 3. Fewer: Meta's ratio high = 4 low, with the original context placed to match.
    if medium.sum() == 1:
        yield _llama3(big, 1.0, 4.0, old_ctx or round(wavelen[medium][0] * (1 + 3 * s[0])))
    elif medium.sum() == 0:
        # Any context with every f = 1 wavelength below context / 4 and every f = F one above the
        # context reproduces the tensor; prefer a power of two (contexts usually are).
        fast, slow = 4 * wavelen[factors == 1.0].max(initial=1.0), wavelen[factors == big].min()
        power = 2 ** math.ceil(math.log2(fast))
        yield _llama3(big, 1.0, 4.0, old_ctx or (power if power < slow else round((fast + slow) / 2)))


def llama3_scaling_from_rope_freqs(factors: np.ndarray, head_dim: int, theta: float,
                                   metadata: Mapping[str, Any], where: str) -> dict | None:
    """HF rope_scaling for a llama.cpp rope_freqs tensor (head_dim // 2,), verified against our
    model's frequencies; None when every factor is 1 (plain rope). ValueError (one line) when no
    llama3 dict reproduces the tensor within fp32 tolerance."""
    if factors.shape != (head_dim // 2,):
        raise ValueError(f"{where}: rope_freqs.weight has shape {factors.shape}, expected ({head_dim // 2},) "
                         f"for rotary dimension {head_dim}")
    if np.all(factors == 1.0):
        return None
    old_ctx = metadata.get("llama.rope.scaling.original_context_length")
    if factors.min() >= 1.0:  # llama3 only ever slows pairs down
        for candidate in _llama3_candidates(factors, head_dim, theta, old_ctx):
            if np.allclose(llama3_rope_factors(head_dim, theta, candidate), factors, rtol=_ROPE_FREQS_RTOL, atol=0):
                return candidate
    raise ValueError(f"{where}: rope_freqs.weight is not llama3 rope scaling (no factor / low_freq_factor / "
                     "high_freq_factor / original context reproduces it); refusing to run at other frequencies")


def _rope_scaling_of_file(gguf: GGUFFile, head_dim: int, theta: float) -> dict | None:
    """rope_scaling of an opened file: metadata keys, or the rope_freqs tensor (not both)."""
    scaling = _rope_scaling(gguf.metadata)
    if "rope_freqs.weight" not in gguf.tensors:
        return scaling
    if scaling is not None:
        # llama.cpp would apply both; HF has one rope_scaling. No released model does this.
        raise ValueError(f"{gguf.path}: has both rope_freqs.weight and llama.rope.scaling.type "
                         f"{scaling['rope_type']!r}; combined rope scaling is not supported")
    factors = gguf.tensor("rope_freqs.weight")
    return llama3_scaling_from_rope_freqs(factors, head_dim, theta, gguf.metadata, str(gguf.path))


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
    if isinstance(source, GGUFFile):
        source.check_supported()  # the loader calls this first: refuse before any work
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
    rotary = metadata.get("llama.rope.dimension_count", head_dim)
    if rotary != head_dim or metadata.get("llama.attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{where}: llama.rope.dimension_count {rotary} / llama.attention.value_length "
                         f"differ from the head size {head_dim}; partial rotary is not a LLaMA layout")
    theta = float(metadata.get("llama.rope.freq_base", 10000.0))  # llama.cpp's default
    if isinstance(source, GGUFFile):
        rope_scaling = _rope_scaling_of_file(source, head_dim, theta)
    elif "rope_freqs.weight" in names:
        # llama.cpp stores llama-3.1 rope scaling only as this per-frequency factor tensor; its
        # values are needed to rebuild HF rope_scaling, and a bare metadata dict has none.
        raise ValueError(f"{where}: has rope_freqs.weight (llama-3.1 style rope scaling); pass the "
                         "GGUFFile so the factors can be read")
    else:
        rope_scaling = _rope_scaling(metadata)

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
        "rope_theta": theta,
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


def _rename(name: str, top: Mapping[str, str], block: Mapping[str, str], block_re: re.Pattern,
            block_form: str) -> str | None:
    """name translated by the top-level / per-block tables (None if neither knows it)."""
    stem, _, kind = name.rpartition(".")
    if stem in top and kind in ("weight", "bias"):
        return f"{top[stem]}.{kind}"
    match = block_re.fullmatch(name)
    if match and match.group(2) in block:
        layer, part, kind = match.groups()
        return block_form.format(layer=layer, part=block[part], kind=kind)
    return None


def hf_name(name: str) -> str:
    """HF LlamaForCausalLM parameter name for a llama.cpp tensor name; ValueError if unknown."""
    target = _rename(name, _TOP_LEVEL_NAMES, _BLOCK_NAMES, _BLOCK_RE, "model.layers.{layer}.{part}.{kind}")
    if target is None:
        raise ValueError(f"unknown llama GGUF tensor name {name!r}: no HF LlamaForCausalLM equivalent")
    return target


_HF_TOP_LEVEL = {hf: g for g, hf in _TOP_LEVEL_NAMES.items()}
_HF_BLOCK = {hf: g for g, hf in _BLOCK_NAMES.items()}
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def gguf_name(name: str) -> str:
    """llama.cpp tensor name for an HF LlamaForCausalLM parameter name (inverse of hf_name)."""
    target = _rename(name, _HF_TOP_LEVEL, _HF_BLOCK, _HF_LAYER_RE, "blk.{layer}.{part}.{kind}")
    if target is None:
        raise ValueError(f"HF tensor {name!r} has no llama GGUF name")
    return target


def _reorder_heads(w: np.ndarray, n_head: int, interleave: bool) -> np.ndarray:
    """Each head's rows (halves <-> pairs) reordered: interleave=True maps HF's
    [x0 .. x_{d/2-1}, y0 .. y_{d/2-1}] to llama.cpp's [x0, y0, x1, y1, ...], False back."""
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"cannot reorder {w.shape[0]} q/k rows into {n_head} heads of even size")
    half = w.shape[0] // n_head // 2
    middle = (2, half) if interleave else (half, 2)
    return np.ascontiguousarray(w.reshape(n_head, *middle, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. w: (n_head * head_dim, ...) -> same shape.

    HF's rotary embedding rotates the two halves of each head (rotate-half); llama.cpp rotates
    adjacent pairs. convert_hf_to_gguf therefore reorders each head's rows from
    [x0 .. x_{d/2-1}, y0 .. y_{d/2-1}] to [x0, y0, x1, y1, ...] via
    w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2); the inverse reads the pairs back out.
    """
    return _reorder_heads(w, n_head, interleave=False)


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp's interleaved order (what convert_hf_to_gguf writes);
    the inverse of unpermute_rotary. w: (n_head * head_dim, ...) -> same shape."""
    return _reorder_heads(w, n_head, interleave=True)


def iter_hf_tensors(gguf: GGUFFile) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 tensor) for every tensor of a llama GGUF, one at a time.

    Tensors are dequantised lazily so peak memory stays near one float32 copy of the model plus
    one tensor; q_proj / k_proj rows are un-permuted back to HF's rotate-half layout.
    """
    _require_llama(gguf.metadata, str(gguf.path))
    gguf.check_supported()
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
