"""ONE-PEACE task models: the encoder branch of one modality with a classification head on top.

The head reproduces the original fine-tuning head numerically: [CLS] pooling or multi-head attention pooling with a
learned query, an optional Tanh pooler, and a two-layer MLP classifier with a LayerNorm and GELU in between.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput, SequenceClassifierOutput

from .configuration_onepeace import OnePeaceConfig
from .modeling_onepeace import (
    OnePeaceAudioAdapter,
    OnePeaceFusionEncoder,
    OnePeaceImageAdapter,
    OnePeacePreTrainedModel,
)


@dataclass
class OnePeaceImageClassifierOutput(ImageClassifierOutput):
    """`ImageClassifierOutput` plus `last_hidden_state`: the image sequence after its final LayerNorm (the head's input)."""

    last_hidden_state: torch.FloatTensor | None = None


@dataclass
class OnePeaceAudioClassifierOutput(SequenceClassifierOutput):
    """`SequenceClassifierOutput` plus `last_hidden_state`: the audio sequence after its final LayerNorm."""

    last_hidden_state: torch.FloatTensor | None = None


class OnePeaceAttentionPooling(nn.Module):
    """One learned query per head attends over the sequence; the heads are concatenated and projected.

    As the original: the key projection has no bias, the scores are not scaled by 1/sqrt(head_dim), padded keys get
    -inf and the softmax is taken in float32.
    """

    def __init__(self, config: OnePeaceConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.query = nn.Parameter(torch.zeros(1, 1, self.num_heads, self.head_dim))
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=True)
        self.out_proj = nn.Linear(hidden, hidden, bias=True)

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.BoolTensor | None = None) -> torch.Tensor:
        """hidden_states (batch, length, hidden); padding_mask (batch, length), True = padding. Returns (batch, hidden)."""
        batch_size, length, _ = hidden_states.shape
        shape = (batch_size, length, self.num_heads, self.head_dim)
        keys = self.k_proj(hidden_states).view(shape)
        values = self.v_proj(hidden_states).view(shape)
        scores = torch.einsum("hd,blhd->bhl", self.query[0, 0].to(keys.dtype), keys)
        if padding_mask is not None:
            scores = scores.masked_fill(padding_mask[:, None, :], float("-inf"))
        probs = F.softmax(scores.float(), dim=-1).to(values.dtype)
        pooled = torch.einsum("bhl,blhd->bhd", probs, values).reshape(batch_size, -1)
        return self.out_proj(pooled)


class OnePeaceClassificationHead(nn.Module):
    """Pooling (CLS or attention) -> optional pooler -> Linear -> LayerNorm -> GELU -> Linear(num_labels)."""

    def __init__(self, config: OnePeaceConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.pooling = config.classifier_pooling
        # Only used after attention pooling; always built so that every original head checkpoint maps fully.
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.attention_pooling = OnePeaceAttentionPooling(config) if self.pooling == "attention" else None
        if config.classifier_use_pooler:
            self.pooler = nn.Sequential(
                nn.Dropout(config.classifier_dropout),
                nn.Linear(hidden, hidden),
                nn.Tanh(),
                nn.Dropout(config.classifier_dropout),
            )
        else:
            self.pooler = None
        inner = int(hidden * config.classifier_head_scale_ratio)
        self.classifier = nn.Sequential(
            nn.Linear(hidden, inner),
            nn.LayerNorm(inner, eps=eps),
            nn.GELU(),
            nn.Linear(inner, config.num_labels),
        )

    def pool(self, last_hidden_state: torch.Tensor, padding_mask: torch.BoolTensor | None = None) -> torch.Tensor:
        if self.attention_pooling is None:
            pooled = last_hidden_state[:, 0]
        else:
            # The CLS slot is left out of attention pooling, as in the original.
            mask = padding_mask[:, 1:] if padding_mask is not None else None
            pooled = self.norm(self.attention_pooling(last_hidden_state[:, 1:], mask))
        return self.pooler(pooled) if self.pooler is not None else pooled

    def forward(self, last_hidden_state: torch.Tensor, padding_mask: torch.BoolTensor | None = None) -> torch.Tensor:
        return self.classifier(self.pool(last_hidden_state, padding_mask))


def classification_loss(config: OnePeaceConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' `problem_type` convention: inferred from num_labels and the labels' dtype when unset."""
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    if config.problem_type == "regression":
        if config.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float())
        return F.mse_loss(logits.float(), labels.float())
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels).float(), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class _OnePeaceForClassification(OnePeacePreTrainedModel):
    """One modality's adapter and the fusion encoder (same weight names as in `OnePeaceModel`) plus the head."""

    modality: str = ""
    adapter_class: type = None

    def __init__(self, config: OnePeaceConfig):
        super().__init__(config)
        if self.modality not in config.modalities:
            raise ValueError(
                f"{type(self).__name__} needs the {self.modality} branch; the config has {config.modalities}."
            )
        self.num_labels = config.num_labels
        self.adapters = nn.ModuleDict({self.modality: self.adapter_class(config)})
        self.encoder = OnePeaceFusionEncoder(config)
        self.classification_head = OnePeaceClassificationHead(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, OnePeaceAttentionPooling):
            std = self.config.initializer_range
            init.trunc_normal_(module.query, std=std, a=-std, b=std)

    def _classify(self, adapter_output, labels, output_hidden_states, output_attentions, return_dict, **kwargs):
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden, states, attentions = self.encoder(
            {self.modality: adapter_output}, output_hidden_states, output_attentions, **kwargs
        )
        last_hidden_state = hidden[self.modality]
        logits = self.classification_head(last_hidden_state, adapter_output.padding_mask)
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        output = self.output_class(
            loss=loss, logits=logits, hidden_states=states, attentions=attentions, last_hidden_state=last_hidden_state
        )
        return output if return_dict else output.to_tuple()


class OnePeaceForImageClassification(_OnePeaceForClassification):
    """ONE-PEACE image branch with the classification head of the original fine-tuned models."""

    modality = "image"
    adapter_class = OnePeaceImageAdapter
    output_class = OnePeaceImageClassifierOutput
    input_modalities = ("image",)
    main_input_name = "pixel_values"

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> OnePeaceImageClassifierOutput | tuple:
        r"""
        pixel_values: (batch, 3, H, W) images, H = W a multiple of 16.
        labels: class indices (batch,) for single-label classification, (batch, num_labels) floats for multi-label,
            or targets for regression (`num_labels == 1`); see `config.problem_type`.
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required.")
        adapter_output = self.adapters["image"](pixel_values)
        return self._classify(adapter_output, labels, output_hidden_states, output_attentions, return_dict, **kwargs)


class OnePeaceForAudioClassification(_OnePeaceForClassification):
    """ONE-PEACE audio branch with the classification head of the original fine-tuned models."""

    modality = "audio"
    adapter_class = OnePeaceAudioAdapter
    output_class = OnePeaceAudioClassifierOutput
    input_modalities = ("audio",)
    main_input_name = "input_values"

    def forward(
        self,
        input_values: torch.FloatTensor | None = None,
        padding_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> OnePeaceAudioClassifierOutput | tuple:
        r"""
        input_values / padding_mask: (batch, samples) 16 kHz waveforms, normalized per clip; 1 = real sample.
        labels: as for [`OnePeaceForImageClassification`].
        """
        if input_values is None:
            raise ValueError("input_values is required.")
        adapter_output = self.adapters["audio"](input_values, padding_mask)
        return self._classify(adapter_output, labels, output_hidden_states, output_attentions, return_dict, **kwargs)


__all__ = [
    "OnePeaceAttentionPooling",
    "OnePeaceAudioClassifierOutput",
    "OnePeaceClassificationHead",
    "OnePeaceForAudioClassification",
    "OnePeaceForImageClassification",
    "OnePeaceImageClassifierOutput",
]
