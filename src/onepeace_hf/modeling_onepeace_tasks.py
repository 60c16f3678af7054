"""ONE-PEACE task models: the adapters of the task's branches and the fusion encoder, with a head on top.

The head reproduces the original fine-tuning head numerically: [CLS] pooling or multi-head attention pooling with a
learned query, an optional Tanh pooler, and a two-layer MLP classifier with a LayerNorm and GELU in between.

Joint models encode text with an image or with audio as one fused sequence (the original's `vl` / `al` encoder
types: text first); the head reads either the text part or the image / audio part of it. The same head with four
outputs and a sigmoid is the original's visual-grounding box regressor.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput, SequenceClassifierOutput
from transformers.utils import ModelOutput

from .attention import capturing_graph
from .configuration_onepeace import OnePeaceConfig
from .modeling_onepeace import (
    AdapterOutput,
    OnePeaceAudioAdapter,
    OnePeaceFusionEncoder,
    OnePeaceImageAdapter,
    OnePeacePreTrainedModel,
    OnePeaceTextAdapter,
    check_adapter_inputs,
)


ADAPTER_CLASSES = {"text": OnePeaceTextAdapter, "image": OnePeaceImageAdapter, "audio": OnePeaceAudioAdapter}


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class OnePeaceImageClassifierOutput(ImageClassifierOutput):
    """`ImageClassifierOutput` plus `last_hidden_state`: the image sequence after its final LayerNorm (head input)."""

    last_hidden_state: torch.FloatTensor | None = None


@dataclass
class OnePeaceAudioClassifierOutput(SequenceClassifierOutput):
    """`SequenceClassifierOutput` plus `last_hidden_state`: the audio sequence after its final LayerNorm."""

    last_hidden_state: torch.FloatTensor | None = None


@dataclass
class OnePeaceMultimodalClassifierOutput(SequenceClassifierOutput):
    """
    Output of the joint text+image / text+audio classifiers.

    last_hidden_state: the fused sequence after the final LayerNorms: the text part (CLS + tokens,
        `input_ids.shape[-1] + 1` positions), then the image / audio part (CLS + patches / frames).
    hidden_states / attentions: the fused sequence per layer (`output_hidden_states` / `output_attentions`).
    last_hidden_state_2 / hidden_states_2 / attentions_2: the same for the text paired with the second image
        (`pixel_values_2`), None otherwise.
    """

    last_hidden_state: torch.FloatTensor | None = None
    last_hidden_state_2: torch.FloatTensor | None = None
    hidden_states_2: tuple[torch.FloatTensor, ...] | None = None
    attentions_2: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class OnePeaceVisualGroundingOutput(ModelOutput):
    """
    Output of [`OnePeaceForVisualGrounding`].

    loss: `loss_l1 + loss_giou` when `labels` are given (the original's RefCOCO criterion).
    loss_l1: L1 distance of the normalized boxes, summed over the four coordinates and averaged over the batch.
    loss_giou: mean `1 - GIoU` over the predicted boxes that are proper boxes (x0 < x1 and y0 < y1).
    logits: (batch, 4) raw head outputs.
    pred_boxes: (batch, 4) boxes `(x0, y0, x1, y1)` in pixels of the model's input image: `sigmoid(logits)` times its
        side. Divide x by `side / original_width` and y by `side / original_height` for the original image.
    last_hidden_state / hidden_states / attentions: of the fused text+image sequence, as for the classifiers.
    """

    loss: torch.FloatTensor | None = None
    loss_l1: torch.FloatTensor | None = None
    loss_giou: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Head
# ----------------------------------------------------------------------------------------------------------------------


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
        """hidden_states (batch, length, hidden); padding_mask (batch, length), True = padding -> (batch, hidden)."""
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
    """Pooling (CLS or attention) -> optional pooler -> Linear -> LayerNorm -> GELU -> Linear(num_outputs).

    num_outputs: width of the last Linear (`config.num_labels` unless given). num_inputs: pooled vectors
    concatenated before the MLP (2 for text paired with two images).
    """

    def __init__(self, config: OnePeaceConfig, num_outputs: int | None = None, num_inputs: int = 1):
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
            nn.Linear(hidden * num_inputs, inner),
            nn.LayerNorm(inner, eps=eps),
            nn.GELU(),
            nn.Linear(inner, num_outputs if num_outputs is not None else config.num_labels),
        )

    def pool(self, last_hidden_state: torch.Tensor, padding_mask: torch.BoolTensor | None = None) -> torch.Tensor:
        if self.attention_pooling is None:
            pooled = last_hidden_state[:, 0]
        else:
            # The CLS slot is left out of attention pooling, as in the original.
            mask = padding_mask[:, 1:] if padding_mask is not None else None
            if mask is not None and not capturing_graph() and mask.all(-1).any():  # their pooled vector is NaN
                rows = mask.all(-1).nonzero().flatten().tolist()
                raise ValueError(f"Rows {rows} of the batch have no token to pool: their attention_mask is all 0.")
            pooled = self.norm(self.attention_pooling(last_hidden_state[:, 1:], mask))
        return self.pooler(pooled) if self.pooler is not None else pooled

    def forward(
        self,
        last_hidden_state: torch.Tensor,
        padding_mask: torch.BoolTensor | None = None,
        second_hidden_state: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pooled = self.pool(last_hidden_state, padding_mask)
        if second_hidden_state is not None:
            # The second pass is pooled with the first pass's padding mask, as in the original (same text).
            pooled = torch.cat([pooled, self.pool(second_hidden_state, padding_mask)], dim=-1)
        return self.classifier(pooled)


class OnePeaceTypeEmbeddings(nn.Module):
    """One learned vector per branch, added to every position of that adapter's output.

    The image branch also has `image_2`, which the second image of a pair adds on top (the original's
    `type_embedding_2`; it exists, unused, whenever image type embeddings do).
    """

    def __init__(self, config: OnePeaceConfig, modalities: tuple[str, ...]):
        super().__init__()
        names = list(modalities) + (["image_2"] if "image" in modalities else [])
        for name in names:
            self.register_parameter(name, nn.Parameter(torch.zeros(1, 1, config.hidden_size)))

    def forward(self, modality: str, embeddings: torch.Tensor, second_image: bool = False) -> torch.Tensor:
        embeddings = embeddings + getattr(self, modality)
        if second_image:
            embeddings = embeddings + self.image_2
        return embeddings


# ----------------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------------


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
        # Integer labels of any width (int32 from NumPy/datasets too); cross_entropy takes int64 only.
        return F.cross_entropy(logits.view(-1, config.num_labels).float(), labels.view(-1).long())
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def multiple_choice_hinge_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """The original's AQA criterion: per question, sum over all choices of max(0, margin + score - correct score),
    averaged over the questions. The correct choice's own term adds the constant `margin`, as in the original."""
    scores = scores.float()
    correct = scores.gather(1, labels.to(scores.device).view(-1, 1))
    return F.relu(margin + scores - correct).sum(-1).mean()


def paired_generalized_box_iou(boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """GIoU of each xyxy box with the target in the same row (the diagonal of torchvision's generalized_box_iou)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    target_area = (targets[:, 2] - targets[:, 0]) * (targets[:, 3] - targets[:, 1])
    overlap = (torch.min(boxes[:, 2:], targets[:, 2:]) - torch.max(boxes[:, :2], targets[:, :2])).clamp(min=0)
    intersection = overlap[:, 0] * overlap[:, 1]
    union = area + target_area - intersection
    hull = (torch.max(boxes[:, 2:], targets[:, 2:]) - torch.min(boxes[:, :2], targets[:, :2])).clamp(min=0)
    hull_area = hull[:, 0] * hull[:, 1]
    return intersection / union - (hull_area - union) / hull_area


def visual_grounding_loss(
    boxes: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The original's RefCOCO criterion on normalized xyxy boxes (batch, 4); returns (total, l1, giou), weights 1 and 1.

    L1 is summed over the coordinates and averaged over the batch. GIoU covers only the predictions that are proper
    boxes (x0 < x1 and y0 < y1); deliberate deviation: when there is none, the original's mean over nothing is NaN,
    here that term is 0 so that one bad batch cannot poison the weights.
    """
    boxes, targets = boxes.float(), targets.float()
    loss_l1 = F.l1_loss(boxes, targets, reduction="sum") / boxes.shape[0]
    valid = (boxes[:, :2] < boxes[:, 2:]).all(-1)
    if valid.any():
        loss_giou = (1 - paired_generalized_box_iou(boxes[valid], targets[valid])).mean()
    else:
        loss_giou = boxes.new_zeros(())
    return loss_l1 + loss_giou, loss_l1, loss_giou


# ----------------------------------------------------------------------------------------------------------------------
# Task models
# ----------------------------------------------------------------------------------------------------------------------


class _OnePeaceTaskModel(OnePeacePreTrainedModel):
    """The task's adapters and the fusion encoder (same weight names as in `OnePeaceModel`) plus the head.

    Subclasses set `input_modalities` (text first for joint models), `num_outputs` (None: `config.num_labels`) and
    `pool_text_by_default` (which part of a fused sequence the head reads when `classifier_pool_text` is None).
    """

    input_modalities: tuple[str, ...] = ()
    num_outputs: int | None = None
    pool_text_by_default: bool = True
    supports_two_images: bool = False
    output_class: type = OnePeaceMultimodalClassifierOutput

    def __init__(self, config: OnePeaceConfig):
        super().__init__(config)
        missing = [m for m in self.input_modalities if m not in config.modalities]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs the {' and '.join(missing)} branch; the config has {config.modalities}."
            )
        if config.classifier_two_images and not self.supports_two_images:
            raise ValueError(f"{type(self).__name__} does not take two images (config.classifier_two_images).")
        self.num_labels = config.num_labels
        self.adapters = nn.ModuleDict({m: ADAPTER_CLASSES[m](config) for m in self.input_modalities})
        if config.classifier_type_embeddings:
            self.type_embeddings = OnePeaceTypeEmbeddings(config, self.input_modalities)
        else:
            self.type_embeddings = None
        self.encoder = OnePeaceFusionEncoder(config)
        num_inputs = 2 if config.classifier_two_images else 1
        self.classification_head = OnePeaceClassificationHead(config, self.num_outputs, num_inputs)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, OnePeaceAttentionPooling):
            std = self.config.initializer_range
            init.trunc_normal_(module.query, std=std, a=-std, b=std)
        elif isinstance(module, OnePeaceTypeEmbeddings):
            for parameter in module.parameters(recurse=False):
                init.zeros_(parameter)

    def get_input_embeddings(self) -> nn.Module | None:
        return self.adapters["text"].embed_tokens if "text" in self.adapters else None

    def set_input_embeddings(self, value: nn.Module):
        self.adapters["text"].embed_tokens = value

    @property
    def pooled_modality(self) -> str:
        """The branch whose part of the (fused) sequence the head reads."""
        if len(self.input_modalities) == 1:
            return self.input_modalities[0]
        pool_text = self.config.classifier_pool_text
        if pool_text is None:
            pool_text = self.pool_text_by_default
        return "text" if pool_text else self.input_modalities[1]

    def _output_flags(self, output_hidden_states, output_attentions, return_dict) -> tuple[bool, bool, bool]:
        config = self.config
        return (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states,
            output_attentions if output_attentions is not None else config.output_attentions,
            return_dict if return_dict is not None else config.return_dict,
        )

    def _encode(self, adapted: dict[str, AdapterOutput], second_image: bool, output_hidden_states, output_attentions,
                **kwargs):
        """Fusion encoder over the adapters' outputs (type embeddings added first); the fused last hidden state."""
        if self.type_embeddings is not None:
            adapted = {
                modality: replace(
                    out, embeddings=self.type_embeddings(modality, out.embeddings, second_image and modality == "image")
                )
                for modality, out in adapted.items()
            }
        hidden, states, attentions = self.encoder(adapted, output_hidden_states, output_attentions, **kwargs)
        last = torch.cat(list(hidden.values()), dim=1) if len(hidden) > 1 else hidden[next(iter(hidden))]
        return hidden, last, states, attentions

    def _run_head(self, adapted, adapted_2=None, output_hidden_states=False, output_attentions=False, **kwargs):
        """Encode (twice with a second image), pool the head's part and classify: the output fields but the loss."""
        modality = self.pooled_modality
        hidden, last, states, attentions = self._encode(
            adapted, False, output_hidden_states, output_attentions, **kwargs
        )
        fields = {"hidden_states": states, "attentions": attentions, "last_hidden_state": last}
        second = None
        if adapted_2 is not None:
            hidden_2, last_2, states_2, attentions_2 = self._encode(
                adapted_2, True, output_hidden_states, output_attentions, **kwargs
            )
            second = hidden_2[modality]
            fields.update(last_hidden_state_2=last_2, hidden_states_2=states_2, attentions_2=attentions_2)
        fields["logits"] = self.classification_head(hidden[modality], adapted[modality].padding_mask, second)
        return fields

    def _classify(self, adapted, labels, output_hidden_states, output_attentions, return_dict, adapted_2=None,
                  **kwargs):
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        fields = self._run_head(adapted, adapted_2, output_hidden_states, output_attentions, **kwargs)
        loss = classification_loss(self.config, fields["logits"], labels) if labels is not None else None
        output = self.output_class(loss=loss, **fields)
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _check_batch(**tensors):
        sizes = {name: t.shape[0] for name, t in tensors.items() if t is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"All inputs must have the same batch size, got {sizes}.")


class OnePeaceForImageClassification(_OnePeaceTaskModel):
    """ONE-PEACE image branch with the classification head of the original fine-tuned models."""

    input_modalities = ("image",)
    output_class = OnePeaceImageClassifierOutput
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
        check_adapter_inputs(pixel_values=pixel_values)
        adapted = {"image": self.adapters["image"](pixel_values)}
        return self._classify(adapted, labels, output_hidden_states, output_attentions, return_dict, **kwargs)


class OnePeaceForAudioClassification(_OnePeaceTaskModel):
    """ONE-PEACE audio branch with the classification head of the original fine-tuned models."""

    input_modalities = ("audio",)
    output_class = OnePeaceAudioClassifierOutput
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
        check_adapter_inputs(input_values=input_values, padding_mask=padding_mask)
        adapted = {"audio": self.adapters["audio"](input_values, padding_mask)}
        return self._classify(adapted, labels, output_hidden_states, output_attentions, return_dict, **kwargs)


class OnePeaceForVisionLanguageClassification(_OnePeaceTaskModel):
    """Text and image encoded as one fused sequence, with the classification head (the original's `vl` head type).

    VQA: the question with the image, answers as labels (multi-label soft scores; the original's criterion sums the
    binary cross-entropy over the answers, i.e. `num_labels` times the mean used here). NLVR2: the statement with
    two images (`classifier_two_images`, usually with `classifier_type_embeddings`): the text is encoded with each
    image and the two pooled vectors are concatenated.
    """

    input_modalities = ("text", "image")
    supports_two_images = True
    main_input_name = "input_ids"

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_2: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> OnePeaceMultimodalClassifierOutput | tuple:
        r"""
        input_ids / attention_mask: tokenized text (no BOS; `</s>` last; pad id 1), 1 = real token.
        pixel_values: (batch, 3, H, W) images, H = W a multiple of 16.
        pixel_values_2: the second image of each pair; required exactly when `config.classifier_two_images`.
        labels: as for [`OnePeaceForImageClassification`].
        """
        if input_ids is None or pixel_values is None:
            raise ValueError("input_ids and pixel_values are required.")
        if self.config.classifier_two_images and pixel_values_2 is None:
            raise ValueError("This model classifies text with two images (classifier_two_images): give pixel_values_2.")
        if pixel_values_2 is not None and not self.config.classifier_two_images:
            raise ValueError("pixel_values_2 is only taken by models with config.classifier_two_images=True.")
        check_adapter_inputs(input_ids, attention_mask, pixel_values)
        self._check_batch(input_ids=input_ids, pixel_values=pixel_values, pixel_values_2=pixel_values_2)
        text = self.adapters["text"](input_ids, attention_mask)
        adapted = {"text": text, "image": self.adapters["image"](pixel_values)}
        adapted_2 = None
        if pixel_values_2 is not None:
            adapted_2 = {"text": text, "image": self.adapters["image"](pixel_values_2)}
        return self._classify(
            adapted, labels, output_hidden_states, output_attentions, return_dict, adapted_2=adapted_2, **kwargs
        )


class OnePeaceForAudioLanguageClassification(_OnePeaceTaskModel):
    """Text and audio encoded as one fused sequence, with the classification head (the original's `al` head type)."""

    input_modalities = ("text", "audio")
    main_input_name = "input_ids"

    def _adapt(self, input_ids, attention_mask, input_values, padding_mask) -> dict[str, AdapterOutput]:
        if input_ids is None or input_values is None:
            raise ValueError("input_ids and input_values are required.")
        check_adapter_inputs(input_ids, attention_mask, input_values=input_values, padding_mask=padding_mask)
        self._check_batch(input_ids=input_ids, input_values=input_values)
        return {
            "text": self.adapters["text"](input_ids, attention_mask),
            "audio": self.adapters["audio"](input_values, padding_mask),
        }

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_values: torch.FloatTensor | None = None,
        padding_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> OnePeaceMultimodalClassifierOutput | tuple:
        r"""
        input_ids / attention_mask: tokenized text (no BOS; `</s>` last; pad id 1), 1 = real token.
        input_values / padding_mask: (batch, samples) 16 kHz waveforms, normalized per clip; 1 = real sample.
        labels: as for [`OnePeaceForImageClassification`].
        """
        adapted = self._adapt(input_ids, attention_mask, input_values, padding_mask)
        return self._classify(adapted, labels, output_hidden_states, output_attentions, return_dict, **kwargs)


class OnePeaceForAudioLanguageMultipleChoice(OnePeaceForAudioLanguageClassification):
    """Scores every (audio, candidate text) pair with a one-output head and ranks the candidates (the original's AQA:
    the question joined with each answer, `" {question} answer: {answer}"`, a margin ranking loss)."""

    num_outputs = 1

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_values: torch.FloatTensor | None = None,
        padding_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> OnePeaceMultimodalClassifierOutput | tuple:
        r"""
        input_ids / attention_mask: (batch, num_choices, length) candidate texts of each audio.
        input_values / padding_mask: (batch, samples) the audio, shared by its candidates.
        labels: (batch,) index of the correct candidate; the loss is [`multiple_choice_hinge_loss`].

        logits are (batch, num_choices); the hidden states are those of the (batch * num_choices) pairs.
        """
        if input_ids is None or input_ids.dim() != 3:
            raise ValueError("input_ids must be (batch, num_choices, length).")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must match input_ids {tuple(input_ids.shape)}.")
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        batch_size, num_choices, length = input_ids.shape
        if labels is not None and labels.shape != (batch_size,):
            raise ValueError(f"labels must be (batch,) = ({batch_size},) indices of the correct candidate, got "
                             f"{tuple(labels.shape)}.")
        if labels is not None and not capturing_graph() and ((labels < 0) | (labels >= num_choices)).any():
            raise ValueError(f"labels must index one of the {num_choices} candidates, got {labels.tolist()}.")
        flat_mask = attention_mask.reshape(-1, length) if attention_mask is not None else None
        repeat = (lambda x: x.repeat_interleave(num_choices, dim=0) if x is not None else None)
        self._check_batch(input_ids=input_ids, input_values=input_values)
        adapted = self._adapt(input_ids.reshape(-1, length), flat_mask, repeat(input_values), repeat(padding_mask))
        fields = self._run_head(adapted, None, output_hidden_states, output_attentions, **kwargs)
        fields["logits"] = fields["logits"].view(batch_size, num_choices)
        loss = multiple_choice_hinge_loss(fields["logits"], labels) if labels is not None else None
        output = self.output_class(loss=loss, **fields)
        return output if return_dict else output.to_tuple()


class OnePeaceForVisualGrounding(_OnePeaceTaskModel):
    """Locates the region a text refers to: one box per (image, text) pair (the original's RefCOCO model).

    Text and image are encoded as one fused sequence; by default the head pools the image part
    (`classifier_pool_text=None`, the original's `use_image_features`) and regresses four numbers whose sigmoid is
    the box `(x0, y0, x1, y1)` relative to the input image.
    """

    input_modalities = ("text", "image")
    num_outputs = 4
    pool_text_by_default = False
    output_class = OnePeaceVisualGroundingOutput
    main_input_name = "input_ids"

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> OnePeaceVisualGroundingOutput | tuple:
        r"""
        input_ids / attention_mask: the referring expression, tokenized (no BOS; `</s>` last; pad id 1).
        pixel_values: (batch, 3, S, S) images resized to a square (the original: S = 384), S a multiple of 16.
        labels: (batch, 4) target boxes `(x0, y0, x1, y1)` in pixels of the input image, as `pred_boxes`; the loss
            compares both divided by S, as the original's normalized targets.
        """
        if input_ids is None or pixel_values is None:
            raise ValueError("input_ids and pixel_values are required.")
        check_adapter_inputs(input_ids, attention_mask, pixel_values)
        if labels is not None and (labels.dim() != 2 or labels.shape[1] != 4):  # before the batch sizes: one box
            raise ValueError(f"labels must be (batch, 4) boxes (x0, y0, x1, y1), got {tuple(labels.shape)}.")
        self._check_batch(input_ids=input_ids, pixel_values=pixel_values, labels=labels)
        if labels is not None and (labels[:, 2:] < labels[:, :2]).any():
            raise ValueError("labels must be boxes (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1.")
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        adapted = {
            "text": self.adapters["text"](input_ids, attention_mask),
            "image": self.adapters["image"](pixel_values),
        }
        fields = self._run_head(adapted, None, output_hidden_states, output_attentions, **kwargs)
        side = pixel_values.shape[-1]
        boxes = fields["logits"].float().sigmoid()
        fields["pred_boxes"] = boxes * side
        if labels is not None:
            fields["loss"], fields["loss_l1"], fields["loss_giou"] = visual_grounding_loss(
                boxes, labels.to(boxes.device).float() / side
            )
        output = OnePeaceVisualGroundingOutput(**fields)
        return output if return_dict else output.to_tuple()


__all__ = [
    "OnePeaceAttentionPooling",
    "OnePeaceAudioClassifierOutput",
    "OnePeaceClassificationHead",
    "OnePeaceForAudioClassification",
    "OnePeaceForAudioLanguageClassification",
    "OnePeaceForAudioLanguageMultipleChoice",
    "OnePeaceForImageClassification",
    "OnePeaceForVisionLanguageClassification",
    "OnePeaceForVisualGrounding",
    "OnePeaceImageClassifierOutput",
    "OnePeaceMultimodalClassifierOutput",
    "OnePeaceTypeEmbeddings",
    "OnePeaceVisualGroundingOutput",
    "multiple_choice_hinge_loss",
    "paired_generalized_box_iou",
    "visual_grounding_loss",
]
