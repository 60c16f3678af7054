"""Optimizer and schedule of the original recipes: AdamW over parameter groups with layer-wise LR decay and no
weight decay on biases, norms and embeddings, and a cosine schedule with linear warmup down to `min_lr`."""

import math
import re

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


# Parameters the original exempts from weight decay besides every bias and every 1-D tensor (norms, layer scales,
# logit scale): CLS embeddings and absolute position embeddings (the original's `no_weight_decay()` list). That list
# misses a comma, so in the original the decoder's image `pos_embed` is decayed by accident; here it is not.
NO_WEIGHT_DECAY_PATTERNS = (
    r"(^|\.)adapters\.(text|image|audio)\.cls_embedding$",
    r"(^|\.)adapters\.text\.embed_positions\.weight$",
    r"(^|\.)adapters\.image\.pos_embed$",
    r"(^|\.)decoder_positions\.(text|audio)\.embed_positions\.weight$",
    r"(^|\.)decoder_positions\.image\.pos_embed$",
)


def layer_id(parameter_name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise LR decay, as the original assigns it: adapters 0 (except relative-position
    table i, which belongs to layer i + 1), fusion layer i -> i + 1, everything else (final norms, projections,
    logit scale, decoder, heads) -> num_layers + 1. Prefixes such as `module.` or PEFT's are ignored."""
    match = re.search(r"(?:^|\.)adapters\.\w+\.rel_pos\.tables\.(\d+)\.", parameter_name)
    if match:
        return int(match.group(1)) + 1
    if re.search(r"(?:^|\.)adapters\.", parameter_name):
        return 0
    match = re.search(r"(?:^|\.)encoder\.layers\.(\d+)\.", parameter_name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def uses_weight_decay(parameter_name: str, parameter: torch.Tensor) -> bool:
    if parameter.ndim <= 1 or parameter_name.endswith(".bias"):
        return False
    return not any(re.search(pattern, parameter_name) for pattern in NO_WEIGHT_DECAY_PATTERNS)


def parameter_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Trainable parameters grouped by (depth, decay): each group carries `weight_decay`, `lr_scale`
    (`layer_decay ** (num_layers + 1 - depth)`, 1 for the top) and the parameter `names`."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}.")
    num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        depth = layer_id(name, num_layers) if layer_decay < 1.0 else num_layers + 1
        decay = uses_weight_decay(name, parameter)
        group = groups.setdefault((depth, decay), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers + 1 - depth),
        })
        group["params"].append(parameter)
        group["names"].append(name)
    if not groups:
        raise ValueError("The model has no trainable parameters.")
    return [groups[key] for key in sorted(groups)]


def create_optimizer(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float = 0.05,
    layer_decay: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW (the original's `adjust_adam` with decoupled decay) with each group's lr = learning_rate * lr_scale."""
    groups = parameter_groups(model, weight_decay, layer_decay)
    for group in groups:
        group["lr"] = learning_rate * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay)


def cosine_schedule_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> LambdaLR:
    """The original's `adjust_cosine`: the schedule lr rises linearly from `min_lr` to the optimizer's peak
    (`defaults["lr"]`) over `warmup_steps`, then follows a cosine down to `min_lr` at `total_steps`; each group gets
    schedule lr * its lr_scale (as the original's optimizer applies `lr_scale`)."""
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps > 0, got {warmup_steps}, {total_steps}.")
    peak = optimizer.defaults["lr"]
    if not 0.0 <= min_lr < peak:
        raise ValueError(f"min_lr must be in [0, peak lr {peak}), got {min_lr}.")

    def factor(step: int) -> float:
        if step < warmup_steps:
            lr = min_lr + step * (peak - min_lr) / warmup_steps
        else:
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            lr = min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))
        return lr / peak

    return LambdaLR(optimizer, factor)
