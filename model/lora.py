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
needs: the input x (often saved once for several layers: q, k and v read the same x), the
positions dropout dropped (int32 indices: 1.6 bits per element at p = 0.05) and the small [N, r]
product. Plain autograd (`lora_update_reference`, what PEFT does) also keeps a float mask and the
dropped-out input: two more float copies of every LoRA layer's input.
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
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.dropout = dropout
        self.merged = False
        self._cast = None  # (key, the frozen weight in a compute dtype): see frozen_weight
        self.reset_lora()

    def reset_lora(self):
        """A ~ kaiming-uniform(a=sqrt(5)) as nn.Linear and PEFT init it, B = 0."""
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[..., in] -> [..., out]."""
        # One dtype inside LoRAUpdate, forward and backward: under autocast (bf16 compute, fp32
        # A and B) its backward runs outside autocast, where mixed dtypes would not multiply.
        # The casts are autograd ops, so A and B get fp32 gradients. x is cast once, here, for
        # both paths (autocast would cast it again for the frozen matmul: the same numbers).
        dtype = compute_dtype(x)
        x = x.to(dtype)
        w = self.frozen_weight(dtype)
        if self.merged:
            return F.linear(x, w, self.bias)
        drops = dropout_drops(x, self.dropout) if self.training else None
        A, B = self.lora_A.to(dtype), self.lora_B.to(dtype)
        frozen = not w.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if frozen and w.dtype == dtype and (self.bias is None or self.bias.dtype == dtype):
            # LoRA's usual case: the frozen product runs inside LoRAUpdate, forward and backward.
            return LoRAUpdate.apply(x, A, B, drops, self.scale, self.dropout, None, w, self.bias)
        # A trainable (or autocast-cast) base weight: autograd differentiates the frozen product.
        # The update is added into y in place (nothing saved y: the matmul's backward needs only
        # W): no output-sized temporary, so no allocation, no extra pass and fewer holes in the
        # CPU heap that a training step's peak memory runs into.
        y = F.linear(x, w, self.bias)
        return LoRAUpdate.apply(x, A, B, drops, self.scale, self.dropout,
                                y if y.dtype == dtype and y.is_contiguous() else None)

    def frozen_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W [out, in] for a matmul in `dtype`: a frozen fp32 W under bf16 autocast is cast once
        and the copy kept while W is unchanged (same tensor, same version), since autocast casts a
        weight that needs no gradient again on every call (SmolLM2: 107M weights cast per step,
        ~0.4 s of a 2.76 s bf16 step on a 2-core EPYC). Not extra memory at the peak: each cast
        is saved for backward anyway. The copy lives while the layer trains (train(False) drops
        it): evaluation casts per call, as autocast does, one layer's weight at a time.
        A trainable W, one already in `dtype`, and compiled code (inductor fuses the cast) get W."""
        w = self.weight
        if w.dtype == dtype or w.requires_grad or not self.training or torch.compiler.is_compiling():
            return w
        key = (dtype, w.device, w.data_ptr(), w._version)
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, w.detach().to(dtype))
        return self._cast[1]

    def train(self, mode: bool = True) -> "LoRALinear":
        if not mode:
            self._cast = None  # the frozen weight's training copy (frozen_weight)
        return super().train(mode)

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


SIGMAS = 8  # gaps drawn at once: their mean count + SIGMAS standard deviations


@torch.compiler.disable  # a data-dependent length: run eagerly between compiled parts
def dropout_drops(x: torch.Tensor, p: float) -> torch.Tensor | None:
    """Where dropout with probability p hits x: the sorted flat indices of the dropped elements,
    int32 [~p * x.numel()] (int64 past 2^31 elements), each element dropped independently
    (None when p == 0).

    Why indices and not a mask drawn per element: at LoRA's p = 0.05, drawing one random number
    per element and passing over a mask cost as much as the layer's matmul on a CPU. In a row of
    independent Bernoulli(p) trials the gaps between hits are geometric, P(gap = k) =
    (1 - p)^(k - 1) p for k = 1, 2, ..., so the hit positions are the running sums of geometric
    draws, minus one: p * n draws instead of n, and applying the dropout is a copy plus a
    scatter of zeros. A geometric draw is floor(log(1 - U) / log(1 - p)) + 1 for U uniform on
    [0, 1), in float64 (1 - U >= 2^-53: no infinite gap, no truncated tail).
    The number of gaps that covers n elements is random: mean + SIGMAS standard deviations are drawn,
    and more only if those fell short (reading the last position back: a host sync on CUDA).
    """
    if p <= 0:
        return None
    n = x.numel()
    count = max(16, int(n * p + SIGMAS * math.sqrt(n * p * (1 - p))))
    scale = 1 / math.log1p(-p)
    positions, end = [], -1
    while end < n - 1:  # the last hit so far is at `end`: draw on until the gaps pass n - 1
        gaps = torch.rand(count, dtype=torch.float64, device=x.device).neg_().log1p_().mul_(scale).floor_().add_(1)
        hits = gaps.to(torch.int64).cumsum_(0).add_(end)
        positions.append(hits)
        end = int(hits[-1])
    hits = torch.cat(positions) if len(positions) > 1 else positions[0]
    hits = hits[: int(torch.searchsorted(hits, n))]
    return hits.to(torch.int32) if n < 2**31 else hits


def keep_mask(drops: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """dropout_drops' indices as a bool mask of `shape`, True where kept (for references, tests)."""
    if drops is None:
        return None
    keep = torch.ones(math.prod(shape), dtype=torch.bool, device=drops.device)
    keep[drops.long()] = False
    return keep.view(shape)


def _zeroed(x: torch.Tensor, drops: torch.Tensor | None, copy: bool = True) -> torch.Tensor:
    """x with the elements at the flat indices `drops` set to 0 (dropout before its 1 / (1 - p)
    scale): a contiguous copy of x (in place with copy=False, x then contiguous), or x itself
    when nothing is dropped."""
    if drops is None:
        return x
    out = x.clone(memory_format=torch.contiguous_format) if copy else x
    out.view(-1).index_fill_(0, drops.long(), 0)
    return out


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """Inverted dropout with a given bool mask: x * keep / (1 - p)."""
    return x if keep is None else x * keep / (1 - p)


def lora_update_reference(x, A, B, keep, scale: float, p: float) -> torch.Tensor:
    """The definition, differentiated by autograd: (dropout(x) A^T) B^T * scale.

    x[..., in], A[r, in], B[out, r], keep: bool like x or None -> [..., out].
    """
    return F.linear(F.linear(_dropped(x, keep, p), A), B) * scale


class LoRAUpdate(torch.autograd.Function):
    """lora_update_reference with a lean backward: saves x, the dropped positions (`drops`, flat
    int32 indices from dropout_drops, or None) and u = c xk A^T [N, r], where xk is x with the
    dropped elements zeroed and c = scale / (1 - p) (scale without dropout).

    Both scalars (LoRA's alpha / r and inverted dropout's 1 / (1 - p)) ride on the [N, r]
    product, so no full-size tensor is ever multiplied by a scalar:
        out = u B^T,  dB = g^T u,  du = c (g B),  dA = (xk^T du)^T,  dx = (du A) zeroed at drops
    with g = grad_out [N, out]; xk is rebuilt from x and drops when A's gradient needs it.

    The update is added in place into the frozen layer's output, [..., out] in x's dtype, in
    one addmm (no [N, out] temporary). That output is either
      - `base`, computed by the caller (a base weight autograd differentiates); its gradient is
        grad_out; or
      - computed here from a frozen `weight` W [out, in] and `bias` [out] (LoRA's usual case):
        y = x W^T + bias, and backward accumulates g W straight into dx's buffer (the GEMM adds
        into it), so the frozen path's input gradient is never a tensor of its own that autograd
        would then add to the update's: one [N, in] allocation and one pass less per layer.
    """

    @staticmethod
    def forward(ctx, x, A, B, drops, scale: float, p: float, base=None, weight=None, bias=None):
        c = scale / (1 - p) if drops is not None else scale  # no drops (eval, p == 0): no dropout
        u = F.linear(_zeroed(x, drops), A) * c  # [..., r]
        ctx.save_for_backward(x, A, B, drops, u, weight)
        ctx.c, ctx.has_base = c, base is not None
        if weight is not None:
            base = F.linear(x, weight, bias)
        elif base is None:
            return F.linear(u, B)
        base.view(-1, B.shape[0]).addmm_(u.reshape(-1, A.shape[0]), B.t())
        if ctx.has_base:
            ctx.mark_dirty(base)
        return base

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, drops, u, weight = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        g = grad_out.reshape(-1, B.shape[0])  # [N, out]
        u = u.reshape(-1, A.shape[0])          # [N, r]
        grad_b = g.t() @ u if need_b else None
        du = (g @ B) * ctx.c                   # [N, r]
        # x^T du, transposed: the long N axis as the GEMM's inner one runs faster on CPU
        # (MKL, [1024, 576] x: 0.46 vs 0.67 ms) than du^T xk; A's gradient is [r, in] either way.
        grad_a = (_zeroed(x, drops).reshape(-1, A.shape[1]).t() @ du).t() if need_a else None
        grad_x = None
        if need_x:  # du @ A is a new contiguous tensor: its dropped entries are zeroed in place
            grad_x = _zeroed((du @ A).view(x.shape), drops, copy=False)
            if weight is not None:  # + g W, accumulated by the GEMM itself
                grad_x.view(-1, A.shape[1]).addmm_(g, weight)
        return grad_x, grad_a, grad_b, None, None, None, grad_out if ctx.has_base else None, None, None


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

