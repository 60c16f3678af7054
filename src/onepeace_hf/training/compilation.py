"""Regional compilation for training: every fusion layer compiled on its own, in place.

The fusion layers hold nearly all of the model's FLOPs, and they repeat, so compiling one layer's forms serves them
all, and the criteria's Python around them (masking, several passes per step) stays eager. The trainer does this when
Accelerate's config asks for regional compilation (`accelerate launch --dynamo_backend inductor
--dynamo_use_regional_compilation`) on one process or DDP, instead of leaving it to Accelerate: there its
`compile_regions` also wraps the model's `nn.ModuleDict`s (adapters, projections, final LayerNorms) in
`OptimizedModule`s, which cannot be indexed ("'OptimizedModule' object is not subscriptable",
huggingface/accelerate#4260).
"""

import contextlib
import logging

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, DynamoBackend
from torch import nn

from ..modeling_onepeace import OnePeaceFusionLayer


logger = logging.getLogger(__name__)

# One pretraining step calls a fusion layer in about ten forms that need their own graph: with and without gradients
# (targets are computed under no_grad), text / image / audio / joint segments, the encoder's and the decoder's widths,
# with and without a relative bias; evaluation adds the eval-mode forms. All layers share one code object, and with
# Dynamo's default limit (8 graphs per code object) the forms past the eighth would silently run eagerly.
TRAINING_RECOMPILE_LIMIT = 64


def compile_fusion_layers(model: nn.Module, **compile_kwargs) -> int:
    """`torch.compile` each fusion layer of `model` (encoder and decoder) in place; returns how many.

    In place (`nn.Module.compile`): names, state dicts, checkpoints and gradient checkpointing are unchanged.
    """
    layers = [module for module in model.modules() if isinstance(module, OnePeaceFusionLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no ONE-PEACE fusion layer to compile.")
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)


@contextlib.contextmanager
def training_recompile_limit():
    """Dynamo's recompile limit raised to `TRAINING_RECOMPILE_LIMIT` (never lowered) for the block."""
    limit = max(torch._dynamo.config.recompile_limit, TRAINING_RECOMPILE_LIMIT)
    with torch._dynamo.config.patch(recompile_limit=limit):
        yield


@contextlib.contextmanager
def regional_compilation(accelerator: Accelerator, model: nn.Module):
    """When Accelerate's config asks for regional compilation on a path where Accelerate would wrap the model's
    containers (one process, DDP): compile the fusion layers now and keep Accelerate from compiling the model again
    while the block (its `prepare`) runs. Otherwise do nothing: DeepSpeed's and FSDP2's paths compile in place, after
    their own wrapping and activation checkpointing."""
    plugin = accelerator.state.dynamo_plugin
    in_place = accelerator.distributed_type == DistributedType.DEEPSPEED or getattr(accelerator, "is_fsdp2", False)
    if plugin.backend == DynamoBackend.NO or not getattr(plugin, "use_regional_compilation", False) or in_place:
        yield
        return
    count = compile_fusion_layers(model, **plugin.to_kwargs())
    logger.info("Compiled %d fusion layers (backend %s)", count, plugin.backend.value.lower())
    backend, plugin.backend = plugin.backend, DynamoBackend.NO
    try:
        yield
    finally:
        plugin.backend = backend
