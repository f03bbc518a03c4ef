"""LoRA: a frozen linear layer plus a trainable low-rank update, applied from outside the model.

    y = x W^T + (dropout(x) A^T B^T) * alpha / r        W [out,in] frozen, A [r,in], B [out,r]

A starts kaiming-uniform and B at zero, so training starts from exactly the base model. A base
layer's bias (Qwen2's q/k/v) stays as it is: frozen, added once, untouched by merging, and not in
the adapter, as PEFT's bias="none" has it.

`LoRALinear` subclasses nn.Linear and keeps the base matrix at `<name>.weight`, so the model's
HF names (and checkpoint loading) are unchanged; the update lives at `<name>.lora_A/lora_B`.
`apply_lora` returns a `LoRAConfig` that says what was applied; whoever saves or trains the
adapter is handed it explicitly (the model carries no hidden LoRA attribute). Adapters are
saved in PEFT's layout (adapter_model.safetensors + adapter_config.json), which
`peft.PeftModel.from_pretrained` loads, and can be merged into a plain HF checkpoint.

The low-rank path runs through `LoRAUpdate`, an autograd Function that saves only what backward
needs: the input x (often saved once for several layers: q, k and v read the same x), the dropout
keep-mask packed 8 per byte (1 bit per element) and the small [N, r] product. Plain autograd
(`lora_update_reference`, what PEFT does) also keeps a float mask and the dropped-out input: two
more float copies of every LoRA layer's input.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.llama import compute_dtype

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAConfig:
    """What apply_lora did: rank, alpha, dropout, the adapted linear layers (leaf names) and the
    modules trained in full beside them. `peft()` gives the same fields under PEFT's names."""
    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    trainable_modules: tuple[str, ...] = field(default=())

    def peft(self) -> dict:
        """The fields of PEFT's adapter_config.json that describe this adapter."""
        return dict(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(self.targets),
                    modules_to_save=list(self.trainable_modules))

    @classmethod
    def from_peft(cls, cfg: dict) -> "LoRAConfig":
        """adapter_config.json's fields -> LoRAConfig."""
        return cls(cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), tuple(cfg["target_modules"]),
                   tuple(cfg.get("modules_to_save") or ()))


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # share base's weight: no copy, no re-init
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.dropout = dropout
        self.merged = False
        self.reset_lora()

    def reset_lora(self):
        """A ~ kaiming-uniform(a=sqrt(5)) as nn.Linear and PEFT init it, B = 0."""
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[..., in] -> [..., out]."""
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        keep = dropout_keep_mask(x, self.dropout) if self.training else None
        # One dtype inside LoRAUpdate, forward and backward: under autocast (bf16 compute, fp32
        # A and B) its backward runs outside autocast, where mixed dtypes would not multiply.
        # The casts are autograd ops, so A and B get fp32 gradients.
        dtype = compute_dtype(x)
        # The update is added into y in place (nothing saved y: the frozen matmul's backward needs
        # only W): no output-sized temporary, so no allocation, no extra pass and fewer holes in
        # the CPU heap that a training step's peak memory runs into.
        return LoRAUpdate.apply(x.to(dtype), self.lora_A.to(dtype), self.lora_B.to(dtype), keep, self.scale,
                                dropout_p(self.dropout), y if y.dtype == dtype and y.is_contiguous() else None)

    def delta(self) -> torch.Tensor:
        """The update as a full matrix, scale * B @ A, [out, in] (computed in fp32)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    @torch.no_grad()
    def merge(self):
        """Fold the update into W (inference: one matmul instead of three)."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha}, dropout={self.dropout}, "
                f"merged={self.merged}")


MASK_BITS = 15  # resolution of the dropout draw: p counts in steps of 2^-15


def dropout_p(p: float) -> float:
    """The dropout probability a keep-mask really draws: p rounded to a multiple of 2^-15
    (0.05 -> 0.0499878); its 1 / (1 - p) rescaling must use this value to stay unbiased."""
    return round(p * 2**MASK_BITS) / 2**MASK_BITS


def dropout_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor | None:
    """Bool mask shaped like x, True with probability 1 - dropout_p(p) (None when p == 0).

    Why not `rand(x.shape) >= p`: drawing the mask costs as much as the layer's matmul on a CPU,
    and each float of torch.rand is one generator draw for 24 bits. One int64 draw holds 63
    random bits (random_() spans [0, 2^63)), so each is split into four 16-bit fields, and the
    top bit of each field is cleared (the last field's is always 0), leaving four independent
    15-bit uniforms per draw: the same Bernoulli mask from a quarter of the draws, about 2.6x
    faster on a CPU (1024 x 576: 0.82 ms vs 2.10 ms on the 2-core Xeon). Any device, one path.
    """
    if p <= 0:
        return None
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    fields = words.view(torch.int16)[:n] & (2**MASK_BITS - 1)   # [n] uniform over 0 .. 2^15 - 1
    return (fields >= round(p * 2**MASK_BITS)).view(x.shape)


# Packing 8 bools (one byte each, 0 or 1) into the 8 bits of one byte is a single int64 multiply:
# word w holds the bools as bytes b0..b7 (little-endian), and w * SPREAD places every b_i at bit
# 63 - i without two partial products ever meeting (their bit positions 63 + 8i - 9j differ for
# every pair i, j), so the top byte is the 8 bools reversed. Multiplying a byte by SPREAD places
# copies of it 9 bits apart, and bit 8m + 7 of the product is bit 7 - m of the byte: shifted down
# by 7 and masked, the bools come back, one per byte. int64 products wrap (two's complement) on
# every torch device, and the bits that wrap are never read.
_SPREAD = 0x8040201008040201 - 2**64   # as a signed int64
_LOW_BITS = 0x0101010101010101


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """Bool mask (any shape, n elements) -> uint8 [ceil(n / 8)], 8 elements per byte."""
    flat = keep.reshape(-1)
    if flat.numel() % 8:
        flat = F.pad(flat.view(torch.uint8), (0, 8 - flat.numel() % 8)).view(torch.bool)
    words = flat.view(torch.uint8).view(torch.int64)  # 8 bools per word
    return (((words * _SPREAD) >> 56) & 0xFF).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """pack_mask's inverse: uint8 [ceil(n / 8)] -> bool mask of `shape` (n elements)."""
    words = ((packed.to(torch.int64) * _SPREAD) >> 7) & _LOW_BITS  # one 0/1 byte per element
    # != 0 rather than a view as bool: inductor (torch 2.13, CPU) fails to compile that view.
    return words.view(torch.uint8)[:math.prod(shape)].view(shape) != 0


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """Inverted dropout with a given mask: x * keep / (1 - p)."""
    return x if keep is None else x * keep / (1 - p)


def _kept(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """x where keep is True, 0 elsewhere (dropout before its 1 / (1 - p) scale): one pass."""
    return x if keep is None else torch.where(keep, x, 0)


def lora_update_reference(x, A, B, keep, scale: float, p: float) -> torch.Tensor:
    """The definition, differentiated by autograd: (dropout(x) A^T) B^T * scale.

    x[..., in], A[r, in], B[out, r], keep: bool like x or None -> [..., out].
    """
    return F.linear(F.linear(_dropped(x, keep, p), A), B) * scale


class LoRAUpdate(torch.autograd.Function):
    """lora_update_reference with a lean backward: saves x, the mask (packed, 1 bit per element)
    and u = c xk A^T [N, r], where xk = x * keep (x where kept, 0 where dropped) and
    c = scale / (1 - p) (scale without a mask).

    Both scalars (LoRA's alpha / r and inverted dropout's 1 / (1 - p)) ride on the [N, r]
    product, so no full-size tensor is ever multiplied by a scalar:
        out = u B^T,  dB = g^T u,  du = c (g B),  dA = du^T xk,  dx = (du A) * keep
    with g = grad_out [N, out]; xk is rebuilt from x and the mask when A's gradient needs it.
    Given `base` [..., out] (the frozen layer's output, in x's dtype), the update is added into it
    in place (one addmm, no [N, out] temporary) and base is returned; its gradient is grad_out.
    """

    @staticmethod
    def forward(ctx, x, A, B, keep, scale: float, p: float, base=None):
        c = scale / (1 - p) if keep is not None else scale  # no mask (eval, p == 0): no dropout
        u = F.linear(_kept(x, keep), A) * c  # [..., r]
        # 1 bit per element instead of a bool's byte: 130 MB less for SmolLM2's step of 4 x 256
        # tokens (7 masks per block), for ~0.1 ms of packing per 576 x 1024 mask.
        ctx.save_for_backward(x, A, B, pack_mask(keep) if keep is not None else None, u)
        ctx.c, ctx.has_base = c, base is not None
        if base is None:
            return F.linear(u, B)
        base.view(-1, B.shape[0]).addmm_(u.reshape(-1, A.shape[0]), B.t())
        ctx.mark_dirty(base)
        return base

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, packed, u = ctx.saved_tensors
        keep = unpack_mask(packed, x.shape) if packed is not None else None
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        g = grad_out.reshape(-1, B.shape[0])  # [N, out]
        u = u.reshape(-1, A.shape[0])          # [N, r]
        grad_b = g.t() @ u if need_b else None
        du = (g @ B) * ctx.c                   # [N, r]
        grad_a = du.t() @ _kept(x, keep).reshape(-1, A.shape[1]) if need_a else None
        grad_x = _kept((du @ A).view(x.shape), keep) if need_x else None
        return grad_x, grad_a, grad_b, None, None, None, grad_out if ctx.has_base else None


def apply_lora(model: nn.Module, targets: list[str] = ALL_LINEAR, r: int = 64, alpha: float = 128,
               dropout: float = 0.05, trainable_modules: list[str] = ()) -> LoRAConfig:
    """Swap every nn.Linear whose name ends in one of `targets` for a LoRALinear, freeze all
    other parameters except those of modules named in trainable_modules (e.g. embed_tokens,
    lm_head: fully trained, as TransLLM does). Modifies `model`; returns what was applied."""
    replaced = 0
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf in targets and type(module) is nn.Linear:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, leaf, LoRALinear(module, r, alpha, dropout))
            replaced += 1
    if replaced == 0:
        raise ValueError(f"apply_lora: no nn.Linear named {targets} in the model")
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name or any(_in_module(name, m) for m in trainable_modules)
    return LoRAConfig(r, alpha, dropout, tuple(targets), tuple(trainable_modules))


def _in_module(param_name: str, module: str) -> bool:
    return param_name.startswith(module + ".") or f".{module}." in param_name


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model: nn.Module, lora: LoRAConfig) -> dict[str, torch.Tensor]:
    """Everything training changed: LoRA A/B and the fully trainable modules, by our names."""
    return {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)
            if ".lora_" in name or any(_in_module(name, m) for m in lora.trainable_modules)}


def _to_peft_name(name: str) -> str:
    # ours: model.layers.0.self_attn.q_proj.lora_A -> PEFT: base_model.model.model.layers.0...lora_A.weight
    if name.endswith((".lora_A", ".lora_B")):
        name += ".weight"
    return PEFT_PREFIX + name


def _from_peft_name(name: str) -> str:
    name = name.removeprefix(PEFT_PREFIX)
    return name.removesuffix(".weight") if (".lora_A." in name or ".lora_B." in name) else name


def save_adapter(model: nn.Module, lora: LoRAConfig, folder: str | os.PathLike, base_model: str = "") -> Path:
    """Write adapter_model.safetensors + adapter_config.json (PEFT's layout) into folder:
    the tensors of `model` that `lora` (apply_lora's result) made trainable."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {_to_peft_name(k): v.contiguous() for k, v in lora_state_dict(model, lora).items()}
    if getattr(model, "config", None) is not None and model.config.tie_embeddings:
        state.pop(PEFT_PREFIX + "lm_head.weight", None)  # the same matrix as embed_tokens
    config = dict(lora.peft(), peft_type="LORA", task_type="CAUSAL_LM", bias="none",
                  fan_in_fan_out=False, inference_mode=True, base_model_name_or_path=base_model)
    tmp = folder / "adapter_model.safetensors.tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> LoRAConfig:
    """Apply the LoRA described by folder/adapter_config.json, load its weights into `model`
    (in place) and return its LoRAConfig."""
    folder = Path(folder)
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / file).exists():
            raise FileNotFoundError(f"{folder / file} not found: is {folder} a LoRA adapter folder?")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}/adapter_config.json: peft_type {cfg['peft_type']!r} is not LORA")
    lora = LoRAConfig.from_peft(cfg)
    if not lora_modules(model):
        apply_lora(model, list(lora.targets), lora.r, lora.alpha, lora.dropout, list(lora.trainable_modules))
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, value in load_file(folder / "adapter_model.safetensors").items():
            name = _from_peft_name(key)
            if name not in params:
                raise ValueError(f"{folder}/adapter_model.safetensors: tensor {key} matches no parameter")
            if params[name].shape != value.shape:
                raise ValueError(f"{folder}/adapter_model.safetensors: {key} has shape {tuple(value.shape)}, "
                                 f"model has {tuple(params[name].shape)}")
            params[name].copy_(value)
    return lora


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put plain nn.Linear layers back, so the
    model is a plain Llama again (for checkpoint.save or inference). Modifies model in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device="meta")
            plain.weight, plain.bias = module.weight, module.bias
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, plain)
    for p in model.parameters():
        p.requires_grad = True
    return model

