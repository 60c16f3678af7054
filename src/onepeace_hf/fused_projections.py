"""Fusing the Q/K/V projections and the two GeGLU input projections into one matmul each, checkpoint unchanged.

ONE-PEACE runs three (hidden x hidden) projections per attention and two (hidden x ffn) per GeGLU FFN on the same
input. One concatenated matmul does the same arithmetic in fewer, larger kernels. The fused module keeps each part's
bias separately (the key projection has none, and must not grow one in training), and state-dict hooks present the
original separate keys, so `save_pretrained` / `load_state_dict` see the usual checkpoint format.
"""

import torch
import torch.nn.functional as F
from torch import nn


# owner attribute of the fused projection -> the separate projections it replaces, in output order
FUSIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class FusedLinear(nn.Module):
    """Several `nn.Linear` of one input as one weight; biases stay per part (None where a part had none)."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.out_features = [linear.out_features for linear in linears]
        self.weight = nn.Parameter(
            torch.cat([linear.weight.detach() for linear in linears]), linears[0].weight.requires_grad
        )
        self.biases = nn.ParameterList(
            [nn.Parameter(linear.bias.detach().clone(), linear.bias.requires_grad) for linear in linears
             if linear.bias is not None]
        )
        self.has_bias = [linear.bias is not None for linear in linears]

    def bias(self) -> torch.Tensor | None:
        if not self.biases:
            return None
        biases, parts = iter(self.biases), []
        for size, has_bias in zip(self.out_features, self.has_bias):
            parts.append(next(biases) if has_bias else self.weight.new_zeros(size))
        return torch.cat(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias())

    def split(self) -> list[nn.Linear]:
        linears, biases = [], iter(self.biases)
        for weight, has_bias in zip(self.weight.detach().split(self.out_features), self.has_bias):
            out_features, in_features = weight.shape
            linear = nn.Linear(in_features, out_features, has_bias, device=weight.device, dtype=weight.dtype)
            linear.weight = nn.Parameter(weight.clone(), self.weight.requires_grad)
            if has_bias:
                bias = next(biases)
                linear.bias = nn.Parameter(bias.detach().clone(), bias.requires_grad)
            linears.append(linear)
        return linears


def _separate_keys(module, state_dict, prefix, local_metadata):
    """state_dict hook: fused weights -> the original `q_proj.weight`, `q_proj.bias`, ... keys."""
    for fused_name, parts in FUSIONS.items():
        fused = getattr(module, fused_name, None)
        if not isinstance(fused, FusedLinear):
            continue
        weight = state_dict.pop(f"{prefix}{fused_name}.weight")
        stored_biases = [state_dict.pop(f"{prefix}{fused_name}.biases.{i}") for i in range(len(fused.biases))]
        biases = iter(stored_biases)
        for part, part_weight, has_bias in zip(parts, weight.split(fused.out_features), fused.has_bias):
            state_dict[f"{prefix}{part}.weight"] = part_weight
            if has_bias:
                state_dict[f"{prefix}{part}.bias"] = next(biases)


def _fuse_keys(module, state_dict, prefix, *args):
    """load_state_dict pre-hook: the original separate keys -> the fused module's keys."""
    for fused_name, parts in FUSIONS.items():
        fused = getattr(module, fused_name, None)
        if not isinstance(fused, FusedLinear) or f"{prefix}{parts[0]}.weight" not in state_dict:
            continue
        state_dict[f"{prefix}{fused_name}.weight"] = torch.cat([state_dict.pop(f"{prefix}{p}.weight") for p in parts])
        stored = [p for p, has_bias in zip(parts, fused.has_bias) if has_bias]
        for i, part in enumerate(stored):
            state_dict[f"{prefix}{fused_name}.biases.{i}"] = state_dict.pop(f"{prefix}{part}.bias")


def fuse_projections(model: nn.Module) -> int:
    """Fuse every attention's Q/K/V and every FFN's gate/up projections in place; returns how many were fused."""
    count = 0
    for module in model.modules():
        for fused_name, parts in FUSIONS.items():
            if getattr(module, fused_name, False) is None:  # the owner declares the slot; None = not fused yet
                linears = [getattr(module, part) for part in parts]
                if not all(type(linear) is nn.Linear for linear in linears):
                    raise ValueError(
                        f"Cannot fuse {type(module).__name__}.{parts}: they are not plain nn.Linear (LoRA adapters "
                        "attached?). Fuse before adding adapters, or merge them first."
                    )
                setattr(module, fused_name, FusedLinear(linears))
                for part in parts:
                    delattr(module, part)
                if not hasattr(module, "_fusion_hooks"):
                    module._fusion_hooks = (
                        module.register_state_dict_post_hook(_separate_keys),
                        module.register_load_state_dict_pre_hook(_fuse_keys),
                    )
                count += 1
    return count


def unfuse_projections(model: nn.Module) -> int:
    """Undo `fuse_projections`; returns how many fused projections were split back."""
    count = 0
    for module in model.modules():
        for fused_name, parts in FUSIONS.items():
            fused = getattr(module, fused_name, None)
            if isinstance(fused, FusedLinear):
                for part, linear in zip(parts, fused.split()):
                    setattr(module, part, linear)
                setattr(module, fused_name, None)
                count += 1
        if hasattr(module, "_fusion_hooks") and not any(
            isinstance(getattr(module, name, None), FusedLinear) for name in FUSIONS
        ):
            for handle in module._fusion_hooks:
                handle.remove()
            del module._fusion_hooks
    return count
