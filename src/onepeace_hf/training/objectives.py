"""What is trained: a model and a criterion as one module, and the parameter freezing of the two-stage schedule."""

import re

import torch
from torch import nn

from ..modeling_onepeace import MAX_LOGIT_SCALE


class TrainingObjective(nn.Module):
    """`criterion(model, **batch)` as the forward of one module.

    The ONE-PEACE criteria run the model several times per step (unmasked, masked, joint passes). Wrapping them in
    one module gives DDP / FSDP a single forward per step, which is what their gradient hooks expect.
    """

    def __init__(self, model: nn.Module, criterion):
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, **batch) -> dict:
        logit_scale = getattr(self.model, "logit_scale", None)
        if self.training and isinstance(logit_scale, nn.Parameter) and logit_scale.requires_grad:
            with torch.no_grad():  # as the original at every training step: the weight itself stays in [0, ln 100]
                logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return self.criterion(self.model, **batch)


# Trainable in the audio-language stage (the original's `stage2_pretrain`): the audio adapter, the audio FFN of every
# fusion layer and the audio final LayerNorm of the encoder. Outside the encoder everything stays trainable as in
# the original (audio projection, decoder, mask tokens and heads, logit scale) except what belongs to the
# text and image branches of the encoder side (the original's audio-language model has no image branch at all).
_ENCODER_PART = re.compile(r"^(adapters|encoder)\.|^projections\.(text|image)\.")
_AUDIO_ENCODER_PART = re.compile(r"^adapters\.audio\.|^encoder\.layers\.\d+\.ffn\.audio\.|^encoder\.final_layer_norms\.audio\.")
_IMAGE_PART = re.compile(r"(^|\.)image(\.|$)")


def freeze_for_audio_language_stage(model: nn.Module) -> list[str]:
    """Freeze what stage 2 keeps fixed (the shared attention, text and image branches); return the trainable names.

    Works on [`OnePeaceForPretraining`] and [`OnePeaceModel`] alike (the names not present are simply absent).
    """
    trainable = []
    for name, parameter in model.named_parameters():
        frozen = (_ENCODER_PART.search(name) and not _AUDIO_ENCODER_PART.search(name)) or _IMAGE_PART.search(name)
        parameter.requires_grad_(not frozen)
        if not frozen:
            trainable.append(name)
    return trainable
