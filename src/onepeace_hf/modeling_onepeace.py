"""ONE-PEACE: modality adapters -> shared fusion encoder (shared attention, modality FFNs) -> projection heads.

Numerics follow the original fairseq implementation (OFA-Sys/ONE-PEACE) exactly, including its quirks; each quirk
is marked with a comment saying so.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput, logging

from .attention import (
    RelativeBias,
    capturing_graph,
    eager_attention_forward,
    image_relative_buckets,
    num_image_buckets,
    num_token_buckets,
    token_relative_buckets,
)
from .configuration_onepeace import OnePeaceConfig, OnePeaceVisionConfig
from .flex_attention import FUSED_ATTENTION, padding_block_mask
from .triton_attention import TRITON_ATTENTION
from .fused_projections import fuse_projections, unfuse_projections


logger = logging.get_logger(__name__)

MAX_LOGIT_SCALE = math.log(100)  # the original's upper bound of logit_scale (a temperature of 0.01)
# What the layers pass to the attention function themselves; the same names among a forward's extra keyword
# arguments (which go on to it) would clash there with an unhelpful TypeError.
ATTENTION_CALL_ARGUMENTS = frozenset({"attention_mask", "scaling", "dropout", "query", "key", "value", "module"})
# Folders whose weights include the embedding projections; a task model's folder (a classifier) has none.
ARCHITECTURES_WITH_PROJECTIONS = ("OnePeaceModel", "OnePeaceForPretraining")


PATCH_SIZE = 16


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class OnePeaceModelOutput(ModelOutput):
    """
    Output of [`OnePeaceModel`].

    text_embeds / image_embeds / audio_embeds: L2-normalized projected [CLS] embeddings (separate passes only).
    logits_per_image (n_images, n_texts), logits_per_text (n_texts, n_images), logits_per_audio (n_audios, n_texts):
        `logit_scale * cosine similarity`.
    logit_scale: the temperature used, `exp(clamp(logit_scale, 0, ln 100))` as the original; only with text and
        images or audio (when there are logits).
    text_last_hidden_state / image_last_hidden_state / audio_last_hidden_state: each modality's sequence after its final
        LayerNorm (position 0 is the modality's CLS slot; padded positions included). In fusion mode these are the
        modality's parts of the joint sequence.
    text_hidden_states / image_hidden_states / audio_hidden_states: per separate pass, the adapter output and the
        output of every fusion layer, (batch, length, hidden) each.
    text_attentions / image_attentions / audio_attentions: per separate pass, attention probabilities of every layer.
    fusion_hidden_states / fusion_attentions: the same for the joint sequence in fusion mode.
    """

    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    logits_per_audio: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    text_last_hidden_state: torch.FloatTensor | None = None
    image_last_hidden_state: torch.FloatTensor | None = None
    audio_last_hidden_state: torch.FloatTensor | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    audio_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_attentions: tuple[torch.FloatTensor, ...] | None = None
    audio_attentions: tuple[torch.FloatTensor, ...] | None = None
    fusion_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    fusion_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class AdapterOutput(ModelOutput):
    """What an adapter hands to the fusion encoder.

    embeddings: (batch, length, hidden), CLS slot first.
    padding_mask: (batch, length) bool, True = padding.
    relative_position_tables: the (num_buckets, heads) bucket tables, one per layer or one shared, or None when the
        adapter has no relative-position bias.
    relative_position_buckets: (length, length) bucket indices, or (batch, length, length) for masked passes.
    """

    embeddings: torch.FloatTensor | None = None
    padding_mask: torch.BoolTensor | None = None
    relative_position_tables: tuple[torch.FloatTensor, ...] | None = None
    relative_position_buckets: torch.LongTensor | None = None

    def relative_position_bias(self, table_index: int = 0) -> torch.FloatTensor | None:
        """(heads, length, length) bias of one table ((batch, heads, ...) for masked passes); the original's form."""
        if self.relative_position_tables is None:
            return None
        bias = self.relative_position_tables[table_index][self.relative_position_buckets]
        return bias.permute(2, 0, 1) if bias.dim() == 3 else bias.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------------------------------


class RelativePositionTables(nn.Module):
    """One bucket table (num_buckets x heads) per layer, or a single one shared by all layers."""

    def __init__(self, config: OnePeaceConfig, num_buckets: int):
        super().__init__()
        num_tables = config.num_hidden_layers if config.rel_pos_table_per_layer else 1
        self.tables = nn.ModuleList(
            [nn.Embedding(num_buckets, config.num_attention_heads) for _ in range(num_tables)]
        )

    def forward(self) -> tuple[torch.Tensor, ...]:
        """The tables themselves: the bias is looked up late (dense for eager/sdpa, inside the fused kernel)."""
        return tuple(table.weight for table in self.tables)


def audio_frame_counts(num_samples: torch.Tensor, conv_spec: list[list[int]]) -> torch.Tensor:
    """Feature frames the conv feature encoder (no padding) makes of `num_samples` samples."""
    for _, kernel, stride in conv_spec:
        num_samples = torch.div(num_samples - kernel, stride, rounding_mode="floor") + 1
    return num_samples


def preserve_positions(preserve_ids: torch.LongTensor) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Gather indices and padding mask of kept positions (`preserve_ids`, -1 padded, CLS = position 0).

    Quirk of the original kept on purpose: padding slots gather position P - 1, P = preserve_ids.shape[1] (they are
    zeroed before the first layer and masked as keys, but their own outputs depend on that position).
    """
    if preserve_ids.dim() != 2:
        raise ValueError(f"preserve_ids must be (batch, kept), got {tuple(preserve_ids.shape)}.")
    padding_mask = preserve_ids.eq(-1)
    return preserve_ids.masked_fill(padding_mask, preserve_ids.shape[1] - 1), padding_mask


def gather_buckets(buckets: torch.LongTensor | None, positions: torch.LongTensor) -> torch.LongTensor | None:
    """(L, L) bucket indices -> (batch, P, P) indices of the kept positions (rows and columns)."""
    if buckets is None:
        return None
    return buckets[positions[:, :, None], positions[:, None, :]]


def gather_rows(x: torch.Tensor, positions: torch.LongTensor) -> torch.Tensor:
    """(batch, L, C) -> (batch, P, C) rows at `positions`."""
    return x.gather(1, positions[:, :, None].expand(-1, -1, x.shape[-1]))


def text_positions(token_padding: torch.BoolTensor) -> torch.LongTensor:
    """(batch, 1 + tokens) absolute positions: CLS 0, the text from 1 on wherever its padding is.

    The original counts positions from the first slot, as right padding leaves them. A left-padded batch (a
    tokenizer with `padding_side="left"`) has its leading pads skipped, so each text gets the positions, and thus the
    embedding, it has alone; relative buckets depend only on distances and need no shift.
    """
    leading_pads = token_padding.long().cumprod(dim=-1).sum(dim=-1, keepdim=True)
    slots = torch.arange(token_padding.shape[1] + 1, device=token_padding.device)
    return (slots - leading_pads).clamp(min=0)


class OnePeaceTextAdapter(nn.Module):
    """Token embeddings with a learned CLS slot, learned absolute positions and a bucketed relative bias."""

    def __init__(self, config: OnePeaceConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.embed_positions = nn.Embedding(config.text_max_position_embeddings, config.hidden_size)
        self.max_length = min(config.text_max_position_embeddings, config.max_relative_positions)
        if config.text_use_rel_bias:
            self.rel_pos = RelativePositionTables(config, num_token_buckets(config.text_rel_bucket_size))
            self.register_buffer("rel_pos_buckets", self.compute_buckets(), persistent=False)
        else:
            self.rel_pos = None

    def compute_buckets(self) -> torch.LongTensor:
        return token_relative_buckets(self.config.text_rel_bucket_size, self.config.max_relative_positions)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        preserve_ids: torch.LongTensor | None = None,
    ) -> AdapterOutput:
        """preserve_ids: optional (batch, kept) positions to keep (CLS = 0, -1 padded), for the masked pass."""
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(
                f"input_ids must be (batch, tokens) token ids, got a {tuple(input_ids.shape)} {input_ids.dtype} tensor."
            )
        batch_size, num_tokens = input_ids.shape
        length = num_tokens + 1
        if length > self.max_length:
            raise ValueError(
                f"Text of {num_tokens} tokens is too long: this model takes at most {self.max_length - 1} tokens."
            )
        if attention_mask is None:
            # The original finds padding by the pad id; with a tokenizer's attention_mask both agree.
            token_padding = input_ids.eq(self.config.pad_token_id)
        else:
            token_padding = attention_mask.eq(0)
        padding_mask = F.pad(token_padding, (1, 0), value=False)
        tokens = self.embed_tokens(input_ids)
        embeddings = torch.cat([self.cls_embedding.expand(batch_size, -1, -1), tokens], dim=1)
        embeddings = embeddings + self.embed_positions(text_positions(token_padding))
        tables = buckets = None
        if self.rel_pos is not None:
            tables, buckets = self.rel_pos(), self.rel_pos_buckets[:length, :length]
        if preserve_ids is not None:
            positions, padding_mask = preserve_positions(preserve_ids)
            embeddings, buckets = gather_rows(embeddings, positions), gather_buckets(buckets, positions)
        return AdapterOutput(embeddings, padding_mask, tables, buckets)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (batch, channels, height, width) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class HierarchicalPatchEmbedding(nn.Module):
    """hMLP stem: 4x4, 2x2, 2x2 non-overlapping convolutions (16x16 patches) with LayerNorm and GELU in between."""

    def __init__(self, config: OnePeaceConfig):
        super().__init__()
        inner = config.hidden_size // 4
        eps = config.layer_norm_eps
        self.layers = nn.Sequential(
            nn.Conv2d(3, inner, kernel_size=4, stride=4),
            LayerNorm2d(inner, eps=eps),
            nn.GELU(),
            nn.Conv2d(inner, inner, kernel_size=2, stride=2),
            LayerNorm2d(inner, eps=eps),
            nn.GELU(),
            nn.Conv2d(inner, config.hidden_size, kernel_size=2, stride=2),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)


class OnePeaceImageAdapter(nn.Module):
    """Patch stem with a learned CLS slot, interpolated absolute positions and a 2-D bucketed relative bias."""

    def __init__(self, config: OnePeaceConfig):
        super().__init__()
        self.config = config
        if config.image_stem == "hmlp":
            self.patch_embed = HierarchicalPatchEmbedding(config)
        else:
            self.patch_embed = nn.Conv2d(3, config.hidden_size, PATCH_SIZE, stride=PATCH_SIZE, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(config.image_pos_grid_size**2 + 1, config.hidden_size))
        if config.image_use_rel_bias:
            self.rel_pos = RelativePositionTables(config, num_image_buckets(config.image_rel_bucket_size))
            self.register_buffer("rel_pos_buckets", self.compute_buckets(), persistent=False)
        else:
            self.rel_pos = None

    def compute_buckets(self, grid_size: int | None = None) -> torch.LongTensor:
        grid_size = grid_size or self.config.image_size // PATCH_SIZE
        return image_relative_buckets(grid_size, self.config.image_rel_bucket_size)

    def position_embeddings(self, grid_size: int) -> torch.Tensor:
        """Absolute positions for a `grid_size` grid: bicubic interpolation in float32 when the size differs."""
        if grid_size == self.config.image_pos_grid_size:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:1], self.pos_embed[1:]
        side = self.config.image_pos_grid_size
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(patch_pos.float(), size=(grid_size, grid_size), mode="bicubic").to(patch_pos.dtype)
        return torch.cat([cls_pos, resized.permute(0, 2, 3, 1).reshape(grid_size * grid_size, -1)], dim=0)

    def forward(self, pixel_values: torch.Tensor, preserve_ids: torch.LongTensor | None = None) -> AdapterOutput:
        """preserve_ids: optional (batch, kept) positions to keep (CLS = 0, -1 padded), for the masked pass."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (batch, 3, height, width), got {tuple(pixel_values.shape)}.")
        height, width = pixel_values.shape[-2:]
        if height != width or height % PATCH_SIZE != 0:
            raise ValueError(
                f"Images must be square with a side that is a multiple of {PATCH_SIZE}, got {height}x{width}."
            )
        batch_size, grid_size = pixel_values.shape[0], height // PATCH_SIZE
        patches = self.patch_embed(pixel_values.to(self.pos_embed.dtype)).flatten(2).transpose(1, 2)
        embeddings = torch.cat([self.cls_embedding.expand(batch_size, -1, -1), patches], dim=1)
        embeddings = embeddings + self.position_embeddings(grid_size)
        padding_mask = torch.zeros(embeddings.shape[:2], dtype=torch.bool, device=embeddings.device)
        tables = buckets = None
        if self.rel_pos is not None:
            tables, buckets = self.rel_pos(), self.rel_pos_buckets
            if buckets.shape[0] != grid_size * grid_size + 1:
                buckets = self.compute_buckets(grid_size).to(buckets.device)
        if preserve_ids is not None:
            positions, padding_mask = preserve_positions(preserve_ids)
            embeddings, buckets = gather_rows(embeddings, positions), gather_buckets(buckets, positions)
        return AdapterOutput(embeddings, padding_mask, tables, buckets)


class TransposedLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (batch, channels, time) sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class AudioFeatureEncoder(nn.Module):
    """wav2vec 2.0 style conv stack (conv -> channel LayerNorm -> GELU per layer), then LayerNorm and Linear."""

    def __init__(self, config: OnePeaceConfig):
        super().__init__()
        layers, in_channels = [], 1
        for channels, kernel, stride in config.audio_conv_spec:
            layers.append(
                nn.Sequential(
                    nn.Conv1d(in_channels, channels, kernel, stride=stride, bias=config.audio_conv_bias),
                    TransposedLayerNorm(channels, eps=config.layer_norm_eps),
                    nn.GELU(),
                )
            )
            in_channels = channels
        self.conv_layers = nn.ModuleList(layers)
        self.layer_norm = nn.LayerNorm(in_channels, eps=config.layer_norm_eps)
        self.projection = nn.Linear(in_channels, config.hidden_size)

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        x = input_values.unsqueeze(1)
        for layer in self.conv_layers:
            x = layer(x)
        return self.projection(self.layer_norm(x.transpose(1, 2)))


class ConvPositionalEmbedding(nn.Module):
    """Stack of grouped 'same' convolutions over the frames, each followed by a non-affine LayerNorm and GELU."""

    def __init__(self, config: OnePeaceConfig):
        super().__init__()
        hidden = config.hidden_size
        self.kernel_size = max(3, config.audio_conv_pos_width // config.audio_conv_pos_depth)
        self.pre_layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps) if config.audio_conv_pos_pre_ln else None
        self.convs = nn.ModuleList(
            [
                nn.Conv1d(hidden, hidden, self.kernel_size, padding=self.kernel_size // 2,
                          groups=config.audio_conv_pos_groups)
                for _ in range(config.audio_conv_pos_depth)
            ]
        )
        self.eps = config.layer_norm_eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.pre_layer_norm(features) if self.pre_layer_norm is not None else features
        x = x.transpose(1, 2)
        trim = 1 if self.kernel_size % 2 == 0 else 0
        for conv in self.convs:
            x = conv(x)
            if trim:
                x = x[:, :, :-trim]
            x = F.gelu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=self.eps).transpose(1, 2))
        return x.transpose(1, 2)


class OnePeaceAudioAdapter(nn.Module):
    """Conv feature encoder with a learned CLS slot, conv (or learned) positions and a bucketed relative bias."""

    def __init__(self, config: OnePeaceConfig):
        super().__init__()
        self.config = config
        self.feature_encoder = AudioFeatureEncoder(config)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        if config.audio_pos_type == "conv":
            self.conv_pos_embed = ConvPositionalEmbedding(config)
            self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        else:
            self.embed_positions = nn.Embedding(config.audio_max_position_embeddings, config.hidden_size)
        if config.audio_use_rel_bias:
            self.rel_pos = RelativePositionTables(config, num_token_buckets(config.audio_rel_bucket_size))
            self.register_buffer("rel_pos_buckets", self.compute_buckets(), persistent=False)
        else:
            self.rel_pos = None

    def compute_buckets(self) -> torch.LongTensor:
        return token_relative_buckets(self.config.audio_rel_bucket_size, self.config.max_relative_positions)

    def frame_padding_mask(self, padding_mask: torch.Tensor, num_frames: int) -> torch.BoolTensor:
        """Per-frame padding (True = pad) from the per-sample mask (1 = real sample), CLS slot included."""
        lengths = audio_frame_counts(padding_mask.sum(-1), self.config.audio_conv_spec)
        frames = torch.arange(num_frames, device=padding_mask.device)
        return F.pad(frames[None, :] >= lengths[:, None], (1, 0), value=False)

    def forward(
        self,
        input_values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        preserve_ids: torch.LongTensor | None = None,
    ) -> AdapterOutput:
        """preserve_ids: optional (batch, kept) frame positions to keep (CLS = 0, -1 padded), for the masked pass;
        the padding mask is then `preserve_ids == -1`."""
        if input_values.dim() != 2:
            raise ValueError(f"input_values must be (batch, samples), got {tuple(input_values.shape)}.")
        num_samples = input_values.shape[1]
        if not self.config.audio_min_samples <= num_samples <= self.config.audio_max_samples:
            rate = self.config.audio_sampling_rate
            raise ValueError(
                f"Audio of {num_samples} samples is outside the supported {self.config.audio_min_samples / rate:g}-"
                f"{self.config.audio_max_samples / rate:g} s at {rate} Hz; preprocess it with OnePeaceFeatureExtractor."
            )
        batch_size = input_values.shape[0]
        features = self.feature_encoder(input_values.to(self.cls_embedding.dtype))
        length = features.shape[1] + 1
        if padding_mask is None:
            frame_padding = torch.zeros(batch_size, length, dtype=torch.bool, device=features.device)
        else:
            if not capturing_graph() and not padding_mask.any(dim=-1).all():
                raise ValueError(
                    "A clip has no real samples: padding_mask is 1 for real samples and 0 for padding (an all-ones "
                    "mask, or none, means no padding)."
                )
            frame_padding = self.frame_padding_mask(padding_mask, features.shape[1])
        positions = None
        if preserve_ids is not None:
            # Quirk of the original kept on purpose: frames are gathered (at ids - 1, CLS excluded) BEFORE the conv
            # positional embedding, which therefore sees only the kept frames (and the P - 1 padding slots).
            positions, frame_padding = preserve_positions(preserve_ids)
            features = gather_rows(features, positions[:, 1:] - 1)
        embeddings = torch.cat([self.cls_embedding.expand(batch_size, -1, -1), features], dim=1)
        if self.config.audio_pos_type == "conv":
            # Quirk of the original: the conv positions see the frames of the zero-padded waveform unmasked, so a
            # padded sample's last valid frames depend on how much padding its batch companions forced on it.
            positions = torch.cat(
                [self.cls_pos_embed.expand(batch_size, -1, -1), self.conv_pos_embed(features)], dim=1
            )
        elif positions is not None:
            positions = self.embed_positions(positions)
        else:
            positions = self.embed_positions.weight[:length]
        embeddings = embeddings + positions
        tables = buckets = None
        if self.rel_pos is not None:
            tables, buckets = self.rel_pos(), self.rel_pos_buckets[:length, :length]
        if preserve_ids is not None:
            buckets = gather_buckets(buckets, preserve_positions(preserve_ids)[0])
        return AdapterOutput(embeddings, frame_padding, tables, buckets)


# ----------------------------------------------------------------------------------------------------------------------
# Fusion encoder: shared self-attention, modality-specific FFN
# ----------------------------------------------------------------------------------------------------------------------


class OnePeaceAttention(nn.Module):
    """Multi-head self-attention with a bias-free key projection, optional per-head scale and Magneto sub-LN."""

    def __init__(self, config: OnePeaceConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.qkv_proj = None  # one (hidden, 3 * hidden) projection after `fuse_projections`
        self.head_scale = nn.Parameter(torch.ones(self.num_heads)) if config.scale_heads else None
        self.inner_layer_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.magneto_scale_attn else None
        )
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(
        self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, length, _ = hidden_states.shape
        shape = (batch_size, length, self.num_heads, self.head_dim)
        if self.qkv_proj is not None:
            projected = self.qkv_proj(hidden_states).chunk(3, dim=-1)
        else:
            projected = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        query, key, value = (x.reshape(shape).transpose(1, 2) for x in projected)

        implementation = kwargs.pop("attention_implementation", None) or self.config._attn_implementation
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_bias,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
            **kwargs,
        )
        # Order of the original: per-head scale -> Magneto LayerNorm -> out_proj.
        if self.head_scale is not None:
            output = output * self.head_scale[:, None]
        output = output.reshape(batch_size, length, -1)
        if self.inner_layer_norm is not None:
            output = self.inner_layer_norm(output)
        return self.out_proj(output), weights


class OnePeaceGeGLUFeedForward(nn.Module):
    """GeGLU FFN with an optional sub-LayerNorm before the output projection."""

    def __init__(self, config: OnePeaceConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.gate_up_proj = None  # one (hidden, 2 * intermediate) projection after `fuse_projections`
        self.dropout = nn.Dropout(config.activation_dropout)
        self.sub_layer_norm = (
            nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps) if config.scale_fc else nn.Identity()
        )
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        x = F.gelu(gate) * up
        return self.down_proj(self.sub_layer_norm(self.dropout(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class OnePeaceFusionLayer(GradientCheckpointingLayer):
    """Pre-LN block: shared attention, then each modality's part of the sequence through that modality's FFN."""

    def __init__(self, config: OnePeaceConfig, layer_idx: int, drop_path: float = 0.0):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn_layer_norm = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = OnePeaceAttention(config, layer_idx)
        self.attn_layer_norm = nn.LayerNorm(hidden, eps=eps) if config.scale_attn else None
        self.final_layer_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn = nn.ModuleDict({modality: OnePeaceGeGLUFeedForward(config) for modality in config.modalities})
        if config.use_layer_scale:
            self.gamma_1 = nn.Parameter(torch.full((hidden,), config.layer_scale_init_value))
            self.gamma_2 = nn.Parameter(torch.full((hidden,), config.layer_scale_init_value))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.drop_path = DropPath(drop_path)

    def residual(self, branch: torch.Tensor, residual: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        branch = self.dropout(branch)
        if gamma is not None:
            branch = gamma * branch
        return self.drop_path(branch) + residual

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor | None,
        segments: tuple[tuple[str, int], ...],
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.self_attn(self.self_attn_layer_norm(hidden_states), attention_bias, **kwargs)
        if self.attn_layer_norm is not None:
            attn_output = self.attn_layer_norm(attn_output)
        hidden_states = self.residual(attn_output, hidden_states, self.gamma_1)

        normed = self.final_layer_norm(hidden_states)
        parts, start = [], 0
        for modality, length in segments:
            parts.append(self.ffn[modality](normed[:, start : start + length]))
            start += length
        ffn_output = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.residual(ffn_output, hidden_states, self.gamma_2), attn_weights


class OnePeaceFusionEncoder(nn.Module):
    """The shared transformer over one modality or a joint text+image / text+audio sequence."""

    def __init__(self, config: OnePeaceConfig, final_layer_norm: bool = True):
        super().__init__()
        self.config = config
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(
            [OnePeaceFusionLayer(config, i, rates[i]) for i in range(config.num_hidden_layers)]
        )
        # The vision branch (a backbone) has none: its users normalize the layers they read.
        self.final_layer_norms = nn.ModuleDict(
            {modality: nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) for modality in config.modalities}
            if final_layer_norm else {}
        )
        self.gradient_checkpointing = False

    @staticmethod
    def relative_biases(adapters: list[AdapterOutput], padding_mask: torch.BoolTensor) -> list[RelativeBias]:
        """One compact `RelativeBias` per relative-position table (per layer, or one shared by all layers).

        Quirks of the original kept on purpose: padding enters attention only through the bias (-inf on padded
        keys), so a sequence whose first adapter has no relative bias gets no masking at all; in a joint sequence the
        number of tables is the first (text) adapter's, and the blocks between modalities are zero.
        """
        if adapters[0].relative_position_tables is None:
            return []
        with_bias = [a for a in adapters if a.relative_position_tables is not None]
        if len(adapters) == 1:
            buckets = adapters[0].relative_position_buckets
        else:
            # Every modality's buckets shifted past the tables before it; all other pairs point at the zero row.
            zero_row = sum(a.relative_position_tables[0].shape[0] for a in with_bias)
            lengths = [a.embeddings.shape[1] for a in adapters]
            batched = any(a.relative_position_buckets.dim() == 3 for a in with_bias)
            shape = (padding_mask.shape[0],) * batched + (sum(lengths),) * 2
            buckets = torch.full(shape, zero_row, dtype=torch.long, device=padding_mask.device)
            start = offset = 0
            for adapter, length in zip(adapters, lengths):
                if adapter.relative_position_tables is not None:
                    block = buckets[..., start : start + length, start : start + length]
                    block.copy_(adapter.relative_position_buckets + offset)
                    offset += adapter.relative_position_tables[0].shape[0]
                start += length
        biases = []
        for i in range(len(adapters[0].relative_position_tables)):
            parts = [a.relative_position_tables[i] for a in with_bias]
            table = torch.cat(parts + [parts[0].new_zeros(1, parts[0].shape[1])])
            biases.append(RelativeBias(table, buckets, padding_mask))
        return biases

    def forward(
        self,
        adapters: dict[str, AdapterOutput],
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[dict[str, torch.Tensor], tuple | None, tuple | None]:
        clashing = sorted(set(kwargs) & ATTENTION_CALL_ARGUMENTS)
        if clashing:  # extra keyword arguments go on to the attention function, which sets these itself
            hint = " (the audio mask is padding_mask)" if "attention_mask" in clashing else ""
            raise TypeError(f"unexpected keyword argument(s) {', '.join(clashing)}{hint}")
        outputs = list(adapters.values())
        segments = tuple((modality, out.embeddings.shape[1]) for modality, out in adapters.items())
        hidden_states = torch.cat([o.embeddings for o in outputs], dim=1) if len(outputs) > 1 else outputs[0].embeddings
        padding_mask = torch.cat([o.padding_mask for o in outputs], dim=1)
        # Padded positions start from zero (the original does this only when the batch has padding: same result).
        hidden_states = hidden_states * (~padding_mask).unsqueeze(-1).to(hidden_states.dtype)
        biases = self.relative_biases(outputs, padding_mask)
        implementation = self.config._attn_implementation
        if output_attentions and implementation != "eager":
            # Only eager computes the probabilities; the fused kernels and SDPA return none.
            logger.warning_once(
                f"output_attentions=True: attention runs eager for such calls, as {implementation!r} returns no "
                "attention weights (outputs equal up to float rounding)."
            )
            implementation = "eager"
            kwargs = {**kwargs, "attention_implementation": implementation}
        if implementation == FUSED_ATTENTION and biases:
            block_mask = padding_block_mask(padding_mask)
            biases = [bias._replace(block_mask=block_mask) for bias in biases]
        elif implementation != TRITON_ATTENTION:  # the Triton kernel reads the compact bias as it is
            biases = [bias.materialize(hidden_states.dtype) for bias in biases]

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for idx, layer in enumerate(self.layers):
            bias = biases[idx if len(biases) > 1 else 0] if biases else None
            hidden_states, weights = layer(hidden_states, bias, segments, **kwargs)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)

        last_hidden_states, start = {}, 0
        for modality, length in segments:
            last = hidden_states[:, start : start + length]
            last_hidden_states[modality] = self.final_layer_norms[modality](last) if self.final_layer_norms else last
            start += length
        return last_hidden_states, all_hidden_states, all_attentions


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained base and model
# ----------------------------------------------------------------------------------------------------------------------


class OnePeacePreTrainedModel(PreTrainedModel):
    config_class = OnePeaceConfig
    config: OnePeaceConfig
    base_model_prefix = "onepeace"
    input_modalities = ("text", "image", "audio")
    supports_gradient_checkpointing = True
    _no_split_modules = ["OnePeaceFusionLayer", "OnePeaceTextAdapter", "OnePeaceImageAdapter", "OnePeaceAudioAdapter"]
    _supports_sdpa = True
    _supports_attention_backend = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """Every ONE-PEACE model attends through `OnePeaceAttention`, which reads the implementation at each call.

        transformers guesses this from a model's source file, and the task models' file (whose attention pooling
        is an `*Attention*(nn.Module)` without the interface) made `set_attn_implementation` a no-op for them.
        """
        return True

    def fuse_projections(self):
        """Run Q/K/V and the two GeGLU input projections as one matmul each (fewer, larger kernels).

        For inference and full fine-tuning; saved checkpoints keep the original separate weights. Not with LoRA
        (it targets the separate projections). Undo with `unfuse_projections`.
        """
        fuse_projections(self)
        return self

    def unfuse_projections(self):
        """Back to separate Q/K/V and GeGLU projections (e.g. before adding LoRA adapters)."""
        unfuse_projections(self)
        return self

    def enable_input_require_grads(self):
        """Make every modality adapter's output require grad (PEFT calls this with gradient checkpointing).

        With a frozen base, the fusion layers' input otherwise has no grad, and a (reentrant) checkpointed layer
        then gives its LoRA weights no gradient. transformers' default hooks `get_input_embeddings()` only, which
        images and audio never pass through (and the task models have no text embedding at all).
        """

        def make_output_require_grad(module, inputs, output):
            if torch.is_grad_enabled():  # not under no_grad / inference_mode, where nothing is backpropagated
                output.embeddings.requires_grad_(True)

        self.disable_input_require_grads()
        adapters = (OnePeaceTextAdapter, OnePeaceImageAdapter, OnePeaceAudioAdapter)
        self._require_grads_hooks = [
            module.register_forward_hook(make_output_require_grad)
            for module in self.modules()
            if isinstance(module, adapters)
        ]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std, a=-std, b=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
        elif isinstance(module, RelativePositionTables):
            for table in module.tables:
                init.zeros_(table.weight)
        elif isinstance(module, nn.Embedding):
            init.trunc_normal_(module.weight, std=std, a=-std, b=std)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, OnePeaceFusionLayer) and module.gamma_1 is not None:
            init.constant_(module.gamma_1, self.config.layer_scale_init_value)
            init.constant_(module.gamma_2, self.config.layer_scale_init_value)
        elif isinstance(module, OnePeaceAttention) and module.head_scale is not None:
            init.ones_(module.head_scale)
        elif isinstance(module, OnePeaceModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)

        if isinstance(module, (OnePeaceTextAdapter, OnePeaceImageAdapter, OnePeaceAudioAdapter)):
            for name in ("cls_embedding", "pos_embed", "cls_pos_embed"):
                if hasattr(module, name):
                    init.trunc_normal_(getattr(module, name), std=std, a=-std, b=std)
            # Non-persistent index buffers are not in checkpoints: recompute them (they are garbage after meta init).
            if module.rel_pos is not None:
                init.copy_(module.rel_pos_buckets, module.compute_buckets())


def check_adapter_inputs(
    input_ids=None, attention_mask=None, pixel_values=None, input_values=None, padding_mask=None
) -> None:
    """Clear errors for inputs the adapters would drop without a word or fail on deep inside attention: a mask
    without its input, a mask of another shape than its input, an empty batch. Every model class calls it."""
    # transformers' audio models call their mask attention_mask; here that is the text's.
    if attention_mask is not None and input_ids is None:
        raise ValueError(
            "attention_mask masks input_ids, which were not given; the audio mask is padding_mask "
            "(1 = real sample, as the processor returns it)."
        )
    if padding_mask is not None and input_values is None:
        raise ValueError(
            "padding_mask masks input_values (audio), which were not given; text takes attention_mask."
        )
    for inputs, mask, names in ((input_ids, attention_mask, "input_ids and attention_mask"),
                                (input_values, padding_mask, "input_values and padding_mask")):
        if mask is not None and mask.shape != inputs.shape:
            raise ValueError(f"{names} must have the same shape, got {tuple(inputs.shape)} and "
                             f"{tuple(mask.shape)}.")
    for name, inputs in (("input_ids", input_ids), ("pixel_values", pixel_values), ("input_values", input_values)):
        if inputs is not None and inputs.dim() > 0 and inputs.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(inputs.shape)}): give at least one item.")


class OnePeaceModel(OnePeacePreTrainedModel):
    """ONE-PEACE encoder with projection heads: embeddings, similarity logits and hidden states of each modality."""

    # A pretraining folder (OnePeaceForPretraining) also holds the denoising decoder, which the encoder does not use.
    _keys_to_ignore_on_load_unexpected = [r"^(decoder|decoder_embed|decoder_positions|mask_tokens|mask_heads)\."]
    def __init__(self, config: OnePeaceConfig):
        super().__init__(config)
        saved_as = (config.architectures or [None])[0]
        if type(self) is OnePeaceModel and saved_as not in (None, *ARCHITECTURES_WITH_PROJECTIONS):
            # AutoModel (and so the feature-extraction pipelines) builds this class from a classifier's folder too.
            logger.warning(
                f"This config was saved by {saved_as}, whose folder has no embedding projections: the embeddings "
                "(`*_embeds`, `get_*_features`) come from randomly initialized projections. The hidden states are "
                "the trained ones."
            )
        adapter_classes = {"text": OnePeaceTextAdapter, "image": OnePeaceImageAdapter, "audio": OnePeaceAudioAdapter}
        self.adapters = nn.ModuleDict({m: adapter_classes[m](config) for m in config.modalities})
        self.encoder = OnePeaceFusionEncoder(config)
        self.projections = nn.ModuleDict({m: nn.Linear(config.hidden_size, config.hidden_size) for m in config.modalities})
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.adapters["text"].embed_tokens if "text" in self.adapters else None

    def set_input_embeddings(self, value: nn.Module):
        self.adapters["text"].embed_tokens = value

    def _adapter(self, modality: str) -> nn.Module:
        if modality not in self.adapters:
            raise ValueError(f"This model has no {modality} branch (modalities: {self.config.modalities}).")
        return self.adapters[modality]

    def _adapt(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        input_values=None,
        padding_mask=None,
    ) -> dict[str, AdapterOutput]:
        """Run the adapters of the given modalities, text first (the order of the original's joint sequences)."""
        check_adapter_inputs(input_ids, attention_mask, pixel_values, input_values, padding_mask)
        adapted = {}
        if input_ids is not None:
            adapted["text"] = self._adapter("text")(input_ids, attention_mask)
        if pixel_values is not None:
            adapted["image"] = self._adapter("image")(pixel_values)
        if input_values is not None:
            adapted["audio"] = self._adapter("audio")(input_values, padding_mask)
        return adapted

    def _project_cls(self, modality: str, last_hidden_state: torch.Tensor) -> torch.Tensor:
        return self.projections[modality](last_hidden_state[:, 0])

    def get_text_features(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected text [CLS] embedding (batch, hidden), before L2 normalization."""
        hidden, _, _ = self.encoder(self._adapt(input_ids=input_ids, attention_mask=attention_mask))
        return self._project_cls("text", hidden["text"])

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image [CLS] embedding (batch, hidden), before L2 normalization."""
        hidden, _, _ = self.encoder(self._adapt(pixel_values=pixel_values))
        return self._project_cls("image", hidden["image"])

    def get_audio_features(self, input_values: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected audio [CLS] embedding (batch, hidden), before L2 normalization."""
        hidden, _, _ = self.encoder(self._adapt(input_values=input_values, padding_mask=padding_mask))
        return self._project_cls("audio", hidden["audio"])

    def clamped_logit_scale(self) -> torch.Tensor:
        """exp(logit_scale) with logit_scale clamped to [0, ln 100], as the original.

        The gradient is that of the clamped value (straight through the clamp): the original clamps the weight itself
        before each training step, so its gradient never vanishes at the bounds, and a plain clamp would leave a
        weight that one step pushed past ln 100 stuck there. `TrainingObjective` clamps the weight as the original.
        """
        scale = self.logit_scale
        return (scale.detach().clamp(0, MAX_LOGIT_SCALE) + (scale - scale.detach())).exp()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        padding_mask: torch.Tensor | None = None,
        fusion: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> OnePeaceModelOutput | tuple:
        r"""
        input_ids / attention_mask: tokenized text (no BOS; `</s>` last; pad id 1), 1 = real token.
        pixel_values: (batch, 3, H, W) images, H = W a multiple of 16.
        input_values / padding_mask: (batch, samples) 16 kHz waveforms, normalized per clip; 1 = real sample.
        fusion: False encodes every given modality on its own (embeddings and similarity logits); True encodes text
            with image or text with audio as one joint sequence (the original's `vl` / `al` encoder types).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        adapted = self._adapt(input_ids, attention_mask, pixel_values, input_values, padding_mask)
        if not adapted:
            raise ValueError("Give at least one of input_ids, pixel_values or input_values.")
        result = {}
        if fusion:
            if set(adapted) not in ({"text", "image"}, {"text", "audio"}):
                raise ValueError(
                    f"fusion=True encodes text+image or text+audio as one sequence; got {sorted(adapted)}."
                )
            sizes = {modality: output.embeddings.shape[0] for modality, output in adapted.items()}
            if len(set(sizes.values())) > 1:
                raise ValueError(f"fusion=True joins row i of each input, so the batch sizes must match; got {sizes}.")
            hidden, states, attentions = self.encoder(adapted, output_hidden_states, output_attentions, **kwargs)
            for modality, last in hidden.items():
                result[f"{modality}_last_hidden_state"] = last
            result["fusion_hidden_states"] = states
            result["fusion_attentions"] = attentions
        else:
            for modality, adapter_output in adapted.items():
                hidden, states, attentions = self.encoder(
                    {modality: adapter_output}, output_hidden_states, output_attentions, **kwargs
                )
                last = hidden[modality]
                result[f"{modality}_last_hidden_state"] = last
                result[f"{modality}_embeds"] = F.normalize(self._project_cls(modality, last), dim=-1)
                result[f"{modality}_hidden_states"] = states
                result[f"{modality}_attentions"] = attentions
            text_embeds = result.get("text_embeds")
            if text_embeds is not None and ("image_embeds" in result or "audio_embeds" in result):
                # Only next to the logits it scales: a one-modality output then holds batch-first tensors only,
                # which transformers pipelines slice per example (feature-extraction with batch_size > 1).
                logit_scale = self.clamped_logit_scale()
                result["logit_scale"] = logit_scale
            if text_embeds is not None and "image_embeds" in result:
                result["logits_per_image"] = logit_scale * result["image_embeds"] @ text_embeds.t()
                result["logits_per_text"] = result["logits_per_image"].t()
            if text_embeds is not None and "audio_embeds" in result:
                result["logits_per_audio"] = logit_scale * result["audio_embeds"] @ text_embeds.t()

        output = OnePeaceModelOutput(**result)
        return output if return_dict else output.to_tuple()


class OnePeaceVisionModel(OnePeacePreTrainedModel):
    """The image branch alone, as the original's `one-peace-vision.pkl`: a backbone for detection and segmentation.

    It returns the fusion layers' outputs without the final LayerNorm and projection (which the vision branch drops).
    """

    config_class = OnePeaceVisionConfig
    config: OnePeaceVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: OnePeaceVisionConfig):
        super().__init__(config)
        self.adapters = nn.ModuleDict({"image": OnePeaceImageAdapter(config)})
        self.encoder = OnePeaceFusionEncoder(config, final_layer_norm=False)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        r"""
        pixel_values: (batch, 3, H, W) images, H = W a multiple of 16.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        adapted = {"image": self.adapters["image"](pixel_values)}
        hidden, states, attentions = self.encoder(adapted, output_hidden_states, output_attentions, **kwargs)
        output = BaseModelOutput(last_hidden_state=hidden["image"], hidden_states=states, attentions=attentions)
        return output if return_dict else output.to_tuple()


__all__ = ["OnePeaceModel", "OnePeacePreTrainedModel", "OnePeaceModelOutput", "OnePeaceVisionModel"]
