"""LoRA: a frozen linear layer plus a trainable low-rank update, applied from outside the model.

    y = x W^T + (dropout(x) A^T B^T) * alpha / r        W [out,in] frozen, A [r,in], B [out,r]

A starts kaiming-uniform and B at zero, so training starts from exactly the base model. A base
layer's bias (Qwen2's q/k/v) stays as it is: frozen, added once, untouched by merging, and not in
the adapter, as PEFT's bias="none" has it.

`LoRALinear` subclasses nn.Linear and keeps the base matrix at `<name>.weight`, so the model's
HF names (and checkpoint loading) are unchanged; the update lives at `<name>.lora_A/lora_B`.
Adapters are saved in PEFT's layout (adapter_model.safetensors + adapter_config.json), which
`peft.PeftModel.from_pretrained` loads, and can be merged into a plain HF checkpoint.

The low-rank path runs through `LoRAUpdate`, an autograd Function that saves only what backward
needs: the input x (often saved once for several layers: q, k and v read the same x), the dropout
keep-mask as bools (1 byte per element) and the small [N, r] product. Plain autograd
(`lora_update_reference`, what PEFT does) also keeps a float mask and the dropped-out input: two
more float copies of every LoRA layer's input.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."


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
        return y + LoRAUpdate.apply(x, self.lora_A, self.lora_B, keep, self.scale, self.dropout)

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


def dropout_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor | None:
    """Bool mask shaped like x, True with probability 1 - p (None when p == 0).

    `rand >= p` draws the same Bernoulli(1 - p) as nn.Dropout's bernoulli_ but about 1.8x faster
    on CPU, where drawing a mask costs about as much as the base layer's matmul.
    """
    return torch.rand(x.shape, device=x.device) >= p if p > 0 else None


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """Inverted dropout with a given mask: x * keep / (1 - p)."""
    return x if keep is None else x * keep / (1 - p)


def lora_update_reference(x, A, B, keep, scale: float, p: float) -> torch.Tensor:
    """The definition, differentiated by autograd: (dropout(x) A^T) B^T * scale.

    x[..., in], A[r, in], B[out, r], keep: bool like x or None -> [..., out].
    """
    return F.linear(F.linear(_dropped(x, keep, p), A), B) * scale


class LoRAUpdate(torch.autograd.Function):
    """lora_update_reference with a lean backward: saves x, the bool mask and xA = dropout(x) A^T
    [N, r]; the dropped-out input is rebuilt from x and the mask when A's gradient needs it.

    With g = grad_out * scale [N, out]:  dB = g^T xA,  d(xA) = g B,  dA = d(xA)^T dropout(x),
    dx = dropout(d(xA) A)  (the same mask and 1/(1-p), since dropout is linear in x).
    """

    @staticmethod
    def forward(ctx, x, A, B, keep, scale: float, p: float):
        xa = F.linear(_dropped(x, keep, p), A)  # [..., r]
        ctx.save_for_backward(x, A, B, keep, xa)
        ctx.scale, ctx.p = scale, p
        return F.linear(xa, B) * scale

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, keep, xa = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        g = (grad_out * ctx.scale).reshape(-1, B.shape[0])  # [N, out]
        xa = xa.reshape(-1, A.shape[0])                      # [N, r]
        grad_b = g.t() @ xa if need_b else None
        grad_xa = g @ B                                      # [N, r]
        grad_a = grad_xa.t() @ _dropped(x, keep, ctx.p).reshape(-1, A.shape[1]) if need_a else None
        grad_x = _dropped((grad_xa @ A).view(x.shape), keep, ctx.p) if need_x else None
        return grad_x, grad_a, grad_b, None, None, None


def apply_lora(model: nn.Module, targets: list[str] = ALL_LINEAR, r: int = 64, alpha: float = 128,
               dropout: float = 0.05, trainable_modules: list[str] = ()) -> nn.Module:
    """Swap every nn.Linear whose name ends in one of `targets` for a LoRALinear, freeze all
    other parameters except those of modules named in trainable_modules (e.g. embed_tokens,
    lm_head: fully trained, as TransLLM does). Modifies and returns `model`."""
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
    model.lora_config = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                             modules_to_save=list(trainable_modules))
    return model


def _in_module(param_name: str, module: str) -> bool:
    return param_name.startswith(module + ".") or f".{module}." in param_name


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything training changed: LoRA A/B and the fully trainable modules, by our names."""
    config = model.lora_config
    return {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)
            if ".lora_" in name or any(_in_module(name, m) for m in config["modules_to_save"])}


def _to_peft_name(name: str) -> str:
    # ours: model.layers.0.self_attn.q_proj.lora_A -> PEFT: base_model.model.model.layers.0...lora_A.weight
    if name.endswith((".lora_A", ".lora_B")):
        name += ".weight"
    return PEFT_PREFIX + name


def _from_peft_name(name: str) -> str:
    name = name.removeprefix(PEFT_PREFIX)
    return name.removesuffix(".weight") if (".lora_A." in name or ".lora_B." in name) else name


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model: str = "") -> Path:
    """Write adapter_model.safetensors + adapter_config.json (PEFT's layout) into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {_to_peft_name(k): v.contiguous() for k, v in lora_state_dict(model).items()}
    if getattr(model, "config", None) is not None and model.config.tie_embeddings:
        state.pop(PEFT_PREFIX + "lm_head.weight", None)  # the same matrix as embed_tokens
    config = dict(model.lora_config, peft_type="LORA", task_type="CAUSAL_LM", bias="none",
                  fan_in_fan_out=False, inference_mode=True, base_model_name_or_path=base_model)
    tmp = folder / "adapter_model.safetensors.tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Apply the LoRA described by folder/adapter_config.json and load its weights."""
    folder = Path(folder)
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / file).exists():
            raise FileNotFoundError(f"{folder / file} not found: is {folder} a LoRA adapter folder?")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}/adapter_config.json: peft_type {cfg['peft_type']!r} is not LORA")
    if not lora_modules(model):
        apply_lora(model, cfg["target_modules"], cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0),
                   cfg.get("modules_to_save") or [])
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
    return model


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
    model.__dict__.pop("lora_config", None)
    return model


def merge_and_save(model: nn.Module, tokenizer, folder: str | os.PathLike):
    """Merge the adapter into the weights and write a plain HF checkpoint."""
    from model.checkpoint import save
    return save(merge_lora(model), tokenizer, folder)
