"""ONE-PEACE configuration.

One flat config describes every architecture option of the original fairseq model, so that any original
checkpoint (pretraining, retrieval, classification) can be expressed. Defaults are the released 4B model.
"""

import copy
import math

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .remote_code import SavesWithoutDanglingAutoMap


MODALITIES = ("text", "image", "audio")

# wav2vec 2.0 style feature encoder of the released model: (channels, kernel, stride) per conv layer.
DEFAULT_AUDIO_CONV_SPEC = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2

POSITIVE_SIZES = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
    "max_relative_positions",
)
DROPOUT_RATES = ("hidden_dropout", "attention_dropout", "activation_dropout", "drop_path_rate")

# Fields of the pretraining decoder that a `decoder_config` dict may set; all others follow the encoder.
DECODER_CONFIG_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "modalities",
    "hidden_dropout", "attention_dropout", "activation_dropout", "drop_path_rate", "magneto_scale_attn",
    "scale_attn", "scale_fc", "scale_heads", "use_layer_scale", "layer_scale_init_value",
    "text_max_position_embeddings", "image_pos_grid_size", "audio_max_position_embeddings",
)
# Decoder of the original pretraining recipes (run_scripts/pretrain/pretrain_{vl,al}_3B.yaml).
DEFAULT_DECODER_CONFIG = {
    "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 12,
    "use_layer_scale": False, "drop_path_rate": 0.0,
}


@strict
class OnePeaceConfig(SavesWithoutDanglingAutoMap, PreTrainedConfig):
    r"""
    Configuration of [`OnePeaceModel`].

    Shared fusion encoder:
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: transformer sizes.
        modalities: which branches exist (any non-empty subset of "text", "image", "audio"); each has an adapter,
            a modality FFN in every layer, a final LayerNorm and a projection head.
        magneto_scale_attn: Magneto sub-LayerNorm on the attention output before `out_proj`.
        scale_attn: an extra LayerNorm on the attention block output (before layer scale).
        scale_fc: sub-LayerNorm inside the GeGLU FFN.
        scale_heads: learned per-head scale of the attention output.
        use_layer_scale / layer_scale_init_value: per-channel residual scaling (gamma_1, gamma_2).
        rel_pos_table_per_layer: one relative-position table per layer (fine-tuned models) instead of one shared.

    Text adapter:
        vocab_size (rows of the embedding table, i.e. max token id + 1), text_max_position_embeddings (absolute
        positions, CLS included), text_rel_bucket_size, text_use_rel_bias, pad_token_id, eos_token_id.

    Image adapter:
        image_size, image_stem ("hmlp": 4-2-2 hierarchical conv stem, "conv": one 16x16 conv), image_pos_grid_size
        (side of the absolute position grid, interpolated at run time for other image sizes),
        image_rel_bucket_size (side of the relative-position grid), image_use_rel_bias.

    Audio adapter:
        audio_conv_spec (list of [channels, kernel, stride]), audio_conv_bias, audio_pos_type ("conv" or "fixed"),
        audio_conv_pos_depth / audio_conv_pos_width / audio_conv_pos_groups / audio_conv_pos_pre_ln,
        audio_max_position_embeddings (for "fixed"), audio_rel_bucket_size, audio_use_rel_bias, audio_sampling_rate,
        audio_min_samples / audio_max_samples (1 s and 15 s at 16 kHz).

    Heads:
        logit_scale_init_value: initial `logit_scale` (log of the inverse temperature).

    Classification head ([`OnePeaceForImageClassification`], [`OnePeaceForAudioClassification`],
    [`OnePeaceForVisionLanguageClassification`], [`OnePeaceForAudioLanguageClassification`],
    [`OnePeaceForAudioLanguageMultipleChoice`]; also the box head of [`OnePeaceForVisualGrounding`]; the label count
    and names are the usual `num_labels` / `id2label` / `label2id`, the classifiers' loss follows `problem_type`):
        classifier_pooling: "cls" reads position 0 of the modality's last hidden state; "attention" pools the other
            positions with one learned query per head (padding excluded), followed by a LayerNorm.
        classifier_use_pooler: Linear + Tanh (between dropouts of `classifier_dropout`) after the pooling.
        classifier_dropout: dropout probability of the pooler.
        classifier_head_scale_ratio: the classifier MLP's inner width is `int(hidden_size * ratio)`.
        classifier_pool_text: joint text+image / text+audio models only: the head reads the text part of the fused
            sequence (True) or its image / audio part (False, the original's `use_image_features`). None takes each
            model's recipe: text for classification, image for visual grounding.
        classifier_two_images: text paired with two images (NLVR2): the text is encoded jointly with each image, the
            two pooled vectors are concatenated before the classifier MLP (whose input is then `2 * hidden_size`).
        classifier_type_embeddings: a learned type embedding is added to every position of each adapter's output,
            and a second one to the second image (the original's `add_type_embedding`, used for NLVR2).
    """

    model_type = "onepeace"

    hidden_size: int = 1536
    intermediate_size: int = 6144
    num_hidden_layers: int = 40
    num_attention_heads: int = 24
    modalities: list[str] | tuple[str, ...] = ("text", "image", "audio")
    layer_norm_eps: float = 1e-5
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    drop_path_rate: float = 0.0
    magneto_scale_attn: bool = True
    scale_attn: bool = False
    scale_fc: bool = True
    scale_heads: bool = False
    use_layer_scale: bool = True
    layer_scale_init_value: float = 1e-6
    rel_pos_table_per_layer: bool = False

    vocab_size: int = 50264
    text_max_position_embeddings: int = 514
    text_rel_bucket_size: int = 256
    text_use_rel_bias: bool = True

    image_size: int = 256
    image_stem: str = "hmlp"
    image_pos_grid_size: int = 16
    image_rel_bucket_size: int = 16
    image_use_rel_bias: bool = True

    audio_conv_spec: list[list[int]] | None = None
    audio_conv_bias: bool = False
    audio_pos_type: str = "conv"
    audio_conv_pos_depth: int = 5
    audio_conv_pos_width: int = 95
    audio_conv_pos_groups: int = 16
    audio_conv_pos_pre_ln: bool = False
    audio_max_position_embeddings: int = 1026
    audio_rel_bucket_size: int = 512
    audio_use_rel_bias: bool = True
    audio_sampling_rate: int = 16000
    audio_min_samples: int = 16000
    audio_max_samples: int = 240000

    logit_scale_init_value: float = math.log(1 / 0.07)

    classifier_pooling: str = "cls"
    classifier_use_pooler: bool = False
    classifier_dropout: int | float = 0.0
    classifier_head_scale_ratio: int | float = 1
    classifier_pool_text: bool | None = None
    classifier_two_images: bool = False
    classifier_type_embeddings: bool = False

    initializer_range: float = 0.02

    pad_token_id: int | None = 1
    bos_token_id: int | None = None
    eos_token_id: int | None = 2

    # The original's relative-position index tables are 1024 x 1024 for text and audio.
    max_relative_positions: int = 1024

    decoder_config: dict | None = None

    def __post_init__(self, **kwargs):
        if self.audio_conv_spec is None:
            self.audio_conv_spec = [list(layer) for layer in DEFAULT_AUDIO_CONV_SPEC]
        else:
            self.audio_conv_spec = [list(layer) for layer in self.audio_conv_spec]
        self.modalities = list(self.modalities)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Refuse combinations the model cannot build, with a message that says what to change."""
        minimums = {name: 1 for name in POSITIVE_SIZES} | {"text_max_position_embeddings": 2}  # CLS + a token
        wrong = [
            f"{name}={getattr(self, name)!r}" for name, least in minimums.items()
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool)
            or getattr(self, name) < least
        ]
        if wrong:
            raise ValueError(
                f"{', '.join(wrong)}: sizes must be positive integers (text_max_position_embeddings >= 2)."
            )
        wrong = [f"{name}={getattr(self, name)!r}" for name in DROPOUT_RATES if not 0.0 <= getattr(self, name) < 1.0]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: dropout rates must be in [0, 1).")
        if "audio" in self.modalities and not 0 < self.audio_min_samples <= self.audio_max_samples:
            raise ValueError(
                f"audio_min_samples ({self.audio_min_samples}) must be positive and at most audio_max_samples "
                f"({self.audio_max_samples})."
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if not self.modalities:
            raise ValueError(f"modalities must name at least one of {MODALITIES}.")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be distinct names from {MODALITIES}, got {self.modalities}.")
        if self.image_size % 16 != 0 or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive multiple of 16 (the patch size), got {self.image_size}.")
        if self.image_stem not in ("hmlp", "conv"):
            raise ValueError(f"image_stem must be 'hmlp' or 'conv', got {self.image_stem!r}.")
        if self.image_stem == "hmlp" and self.hidden_size % 4 != 0:
            raise ValueError(f"the hmlp image stem needs hidden_size divisible by 4, got {self.hidden_size}.")
        if self.audio_pos_type not in ("conv", "fixed"):
            raise ValueError(f"audio_pos_type must be 'conv' or 'fixed', got {self.audio_pos_type!r}.")
        spec = self.audio_conv_spec
        if not spec or any(
            len(layer) != 3 or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in layer)
            for layer in spec
        ):
            raise ValueError(
                "audio_conv_spec must be a non-empty list of [channels, kernel, stride] positive integers, "
                f"got {spec}."
            )
        if self.audio_pos_type == "conv" and self.hidden_size % self.audio_conv_pos_groups != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by audio_conv_pos_groups "
                f"({self.audio_conv_pos_groups})."
            )
        if "audio" in self.modalities:
            self.validate_audio_length()
        for name in ("text_rel_bucket_size", "audio_rel_bucket_size"):
            if not 2 <= getattr(self, name) < self.max_relative_positions:
                raise ValueError(f"{name} must be in [2, {self.max_relative_positions}), got {getattr(self, name)}.")
        if self.image_rel_bucket_size < 1 or self.image_pos_grid_size < 1:
            raise ValueError("image_rel_bucket_size and image_pos_grid_size must be positive.")
        if self.classifier_pooling not in ("cls", "attention"):
            raise ValueError(f"classifier_pooling must be 'cls' or 'attention', got {self.classifier_pooling!r}.")
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"classifier_dropout must be in [0, 1), got {self.classifier_dropout}.")
        if int(self.hidden_size * self.classifier_head_scale_ratio) < 1:
            raise ValueError(
                "classifier_head_scale_ratio must give the classifier at least one hidden unit "
                f"(int(hidden_size * ratio) >= 1), got {self.classifier_head_scale_ratio}."
            )
        if self.decoder_config is not None:
            self.get_decoder_config()

    def get_decoder_config(self) -> "OnePeaceConfig":
        """The pretraining decoder as a config of its own: the encoder's settings with `decoder_config` applied,
        no relative-position bias and learned ("fixed") audio positions. Raises ValueError on a bad decoder_config."""
        overrides = DEFAULT_DECODER_CONFIG if self.decoder_config is None else self.decoder_config
        if not isinstance(overrides, dict):
            raise ValueError(f"decoder_config must be a dict or None, got {type(overrides).__name__}.")
        unknown = sorted(set(overrides) - set(DECODER_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"decoder_config has unknown keys {unknown}; allowed: {list(DECODER_CONFIG_KEYS)}.")
        decoder = copy.deepcopy(self)
        decoder.decoder_config = None
        for key, value in overrides.items():
            setattr(decoder, key, list(value) if key == "modalities" else value)
        decoder.text_use_rel_bias = decoder.image_use_rel_bias = decoder.audio_use_rel_bias = False
        decoder.audio_pos_type = "fixed"
        try:
            decoder.validate_architecture()
        except ValueError as error:
            raise ValueError(f"invalid decoder_config: {error}") from error
        missing = [m for m in decoder.modalities if m not in self.modalities]
        if missing:
            raise ValueError(f"decoder_config modalities {missing} have no encoder branch ({self.modalities}).")
        return decoder

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def audio_frame_count(self, num_samples: int) -> int:
        """Feature frames the conv feature encoder produces for `num_samples` samples (no padding, no dilation)."""
        length = num_samples
        for _, kernel, stride in self.audio_conv_spec:
            length = (length - kernel) // stride + 1
        return length

    def validate_audio_length(self) -> None:
        """The longest clip (`audio_max_samples`) must fit the position tables: its frames plus CLS index the
        relative-position buckets (`max_relative_positions` square) and, for "fixed" positions, the embeddings."""
        positions = self.audio_frame_count(self.audio_max_samples) + 1
        limits = {}
        if self.audio_use_rel_bias:
            limits["max_relative_positions"] = self.max_relative_positions
        if self.audio_pos_type == "fixed":
            limits["audio_max_position_embeddings"] = self.audio_max_position_embeddings
        for name, limit in limits.items():
            if positions > limit:
                longest = longest_audio_samples(self.audio_conv_spec, limit)
                rate = self.audio_sampling_rate
                raise ValueError(
                    f"audio_max_samples ({self.audio_max_samples}, {self.audio_max_samples / rate:g} s) gives "
                    f"{positions} audio positions with this audio_conv_spec, more than {name} ({limit}) allows: set "
                    f"audio_max_samples to at most {longest} ({longest / rate:.2f} s), and the feature extractor's "
                    "max_samples to match."
                )


def audio_samples_for_frames(conv_spec: list[list[int]], num_frames: int) -> int:
    """The fewest samples from which the conv stem `conv_spec` makes `num_frames` frames."""
    length = num_frames
    for _, kernel, stride in reversed(conv_spec):
        length = (length - 1) * stride + kernel
    return length


def longest_audio_samples(conv_spec: list[list[int]], max_positions: int) -> int:
    """The most samples whose frames, with the CLS slot, fill at most `max_positions` positions."""
    return audio_samples_for_frames(conv_spec, max_positions) - 1


__all__ = ["OnePeaceConfig"]


@strict
class OnePeaceVisionConfig(OnePeaceConfig):
    r"""
    Configuration of [`OnePeaceVisionModel`]: the image branch alone, as the original's `one-peace-vision.pkl`
    (a backbone for detection and segmentation). The fields are those of [`OnePeaceConfig`]; `modalities` is
    always `["image"]`.
    """

    model_type = "onepeace_vision"

    modalities: list[str] | tuple[str, ...] = ("image",)

    def validate_architecture(self):
        if list(self.modalities) != ["image"]:  # first: a full model's decoder_config would fail with less to say
            raise ValueError(
                f"The vision branch has only the image modality, got {list(self.modalities)}: a folder of the full "
                "model loads with OnePeaceModel or AutoModel (its image tower is `get_image_features`)."
            )
        super().validate_architecture()
