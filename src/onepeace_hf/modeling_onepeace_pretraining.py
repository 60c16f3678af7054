"""ONE-PEACE pretraining model: the encoder run on the kept (unmasked) positions plus the small denoising decoder.

Masked pass (the original's `OnePeacePretrainModel` with `*_preserve_ids`): the encoder adapters gather the kept
positions, the shared encoder runs on them only, each kept output is mapped to the decoder width and scattered into
a full-length sequence of mask tokens, decoder absolute positions are added, the decoder (a second fusion encoder
without relative bias) runs on the full length, and `*_mask_head` maps back to the encoder width.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_onepeace import OnePeaceConfig
from .modeling_onepeace import (
    PATCH_SIZE,
    AdapterOutput,
    OnePeaceFusionEncoder,
    OnePeaceImageAdapter,
    OnePeaceModel,
    check_adapter_inputs,
)


@dataclass
class OnePeaceForPretrainingOutput(ModelOutput):
    """
    Output of [`OnePeaceForPretraining`]; fields of modalities not in the pass are None.

    {text,image,audio}_embeds: unmasked single-modality passes only: L2-normalized projected CLS embedding (what
        the contrastive losses use).
    {text,image,audio}_encoder_last_hidden_state: encoder output after the modality's final LayerNorm. Masked pass:
        (batch, kept, hidden), row j = position `*_preserve_ids[:, j]` (rows where that id is -1 are padding).
        Unmasked pass (no preserve ids for any modality): the full sequence (the teacher features).
    {text,image,audio}_encoder_padding_mask: padding mask of those rows (True = padding).
    {text,image,audio}_decoder_output: `*_mask_head(decoder output)`, (batch, full length, hidden), CLS slot first;
        only for masked passes.
    {text,image,audio}_padding_mask: full-length padding mask (the decoder's), True = padding.
    """

    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    text_encoder_last_hidden_state: torch.FloatTensor | None = None
    image_encoder_last_hidden_state: torch.FloatTensor | None = None
    audio_encoder_last_hidden_state: torch.FloatTensor | None = None
    text_encoder_padding_mask: torch.BoolTensor | None = None
    image_encoder_padding_mask: torch.BoolTensor | None = None
    audio_encoder_padding_mask: torch.BoolTensor | None = None
    text_decoder_output: torch.FloatTensor | None = None
    image_decoder_output: torch.FloatTensor | None = None
    audio_decoder_output: torch.FloatTensor | None = None
    text_padding_mask: torch.BoolTensor | None = None
    image_padding_mask: torch.BoolTensor | None = None
    audio_padding_mask: torch.BoolTensor | None = None


class OnePeaceDecoderTextPositions(nn.Module):
    def __init__(self, config: OnePeaceConfig):
        super().__init__()
        self.embed_positions = nn.Embedding(config.text_max_position_embeddings, config.hidden_size)

    def forward(self, length: int) -> torch.Tensor:
        return self.embed_positions.weight[:length]


class OnePeaceDecoderImagePositions(nn.Module):
    def __init__(self, config: OnePeaceConfig):
        super().__init__()
        self.config = config
        self.pos_embed = nn.Parameter(torch.zeros(config.image_pos_grid_size**2 + 1, config.hidden_size))

    def forward(self, length: int) -> torch.Tensor:
        grid_size = round((length - 1) ** 0.5)
        # Same bicubic interpolation as the encoder image adapter for other image sizes.
        return OnePeaceImageAdapter.position_embeddings(self, grid_size)


class OnePeaceDecoderAudioPositions(nn.Module):
    """Learned ("fixed") absolute positions, CLS slot included."""

    def __init__(self, config: OnePeaceConfig):
        super().__init__()
        self.embed_positions = nn.Embedding(config.audio_max_position_embeddings, config.hidden_size)

    def forward(self, length: int) -> torch.Tensor:
        return self.embed_positions.weight[:length]


def scatter_kept(mask_token: torch.Tensor, kept: torch.Tensor, preserve_ids: torch.LongTensor, length: int):
    """Full-length (batch, length, dim) sequence of `mask_token` with row `preserve_ids[b, j]` = `kept[b, j]`."""
    batch_size, _, dim = kept.shape
    full = mask_token.reshape(1, 1, dim).expand(batch_size, length, dim).clone()
    valid = preserve_ids.ne(-1)
    batch_index = torch.arange(batch_size, device=kept.device)[:, None].expand_as(preserve_ids)
    full[batch_index[valid], preserve_ids[valid]] = kept[valid].to(full.dtype)
    return full


class OnePeaceForPretraining(OnePeaceModel):
    """[`OnePeaceModel`] (same encoder modules and weight names) plus the denoising decoder of pretraining.

    `forward` runs one pretraining pass; the encoder-only API of [`OnePeaceModel`] (`get_*_features`,
    `clamped_logit_scale`, `encode`) stays available.
    """

    _no_split_modules = OnePeaceModel._no_split_modules + [
        "OnePeaceDecoderTextPositions", "OnePeaceDecoderImagePositions", "OnePeaceDecoderAudioPositions"
    ]

    def __init__(self, config: OnePeaceConfig):
        super().__init__(config)
        decoder_config = config.get_decoder_config()
        self.decoder_config = decoder_config
        position_classes = {
            "text": OnePeaceDecoderTextPositions,
            "image": OnePeaceDecoderImagePositions,
            "audio": OnePeaceDecoderAudioPositions,
        }
        modalities = decoder_config.modalities
        self.decoder_positions = nn.ModuleDict({m: position_classes[m](decoder_config) for m in modalities})
        self.decoder = OnePeaceFusionEncoder(decoder_config)
        enc, dec = config.hidden_size, decoder_config.hidden_size
        self.decoder_embed = nn.ModuleDict({m: nn.Linear(enc, dec) for m in modalities})
        self.mask_tokens = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, dec)) for m in modalities})
        self.mask_heads = nn.ModuleDict({m: nn.Linear(dec, enc) for m in modalities})
        self.post_init()

    def encode(self, *args, **kwargs):
        """[`OnePeaceModel.forward`]: embeddings, similarity logits and hidden states of unmasked inputs."""
        return OnePeaceModel.forward(self, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, OnePeaceDecoderImagePositions):
            init.trunc_normal_(module.pos_embed, std=std, a=-std, b=std)
        elif module is getattr(self, "mask_tokens", None):
            # The ParameterDict itself is the module transformers initializes when a folder lacks the tokens (an
            # encoder-only folder): a branch on the root model never runs then, and they stayed uninitialized memory.
            for token in module.values():
                init.trunc_normal_(token, std=std, a=-std, b=std)

    def _full_padding_mask(self, modality, input_ids, attention_mask, pixel_values, input_values, padding_mask):
        """The full-length padding mask (CLS slot first) the decoder uses, as the unmasked adapter computes it."""
        if modality == "text":
            pads = input_ids.eq(self.config.pad_token_id) if attention_mask is None else attention_mask.eq(0)
            return nn.functional.pad(pads, (1, 0), value=False)
        if modality == "image":
            grid = pixel_values.shape[-1] // PATCH_SIZE
            return torch.zeros(pixel_values.shape[0], grid * grid + 1, dtype=torch.bool, device=pixel_values.device)
        num_frames = self.config.audio_frame_count(input_values.shape[1])
        if padding_mask is None:
            return torch.zeros(input_values.shape[0], num_frames + 1, dtype=torch.bool, device=input_values.device)
        return self.adapters["audio"].frame_padding_mask(padding_mask, num_frames)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        padding_mask: torch.Tensor | None = None,
        text_preserve_ids: torch.LongTensor | None = None,
        image_preserve_ids: torch.LongTensor | None = None,
        audio_preserve_ids: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> OnePeaceForPretrainingOutput | tuple:
        r"""
        One pass of the original's pretraining model; which one follows from the inputs given: text, image or audio
        alone (`text` / `image` / `audio`), text with image (`vl`) or text with audio (`al`, one joint sequence).

        input_ids / attention_mask, pixel_values, input_values / padding_mask: as for [`OnePeaceModel`].
        {text,image,audio}_preserve_ids: (batch, kept) int64 positions to keep, counted with CLS = 0, ascending,
            padded with -1. When any is given the pass is masked: the encoder sees the kept positions of those
            modalities (all positions of a modality without preserve ids) and the decoder reconstructs every
            modality of the pass. Without any, only the (unmasked, teacher) encoder pass is run.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        preserve = {"text": text_preserve_ids, "image": image_preserve_ids, "audio": audio_preserve_ids}
        given = {"text": input_ids, "image": pixel_values, "audio": input_values}
        modalities = [m for m in ("text", "image", "audio") if given[m] is not None]
        if modalities not in (["text"], ["image"], ["audio"], ["text", "image"], ["text", "audio"]):
            raise ValueError(f"A pass takes text, image, audio, text+image or text+audio inputs; got {modalities}.")
        for modality, ids in preserve.items():
            if ids is not None and modality not in modalities:
                raise ValueError(f"{modality}_preserve_ids given without {modality} inputs.")
        check_adapter_inputs(input_ids, attention_mask, pixel_values, input_values, padding_mask)

        adapted = {}
        for modality in modalities:
            adapter = self._adapter(modality)
            if modality == "text":
                adapted["text"] = adapter(input_ids, attention_mask, preserve_ids=text_preserve_ids)
            elif modality == "image":
                adapted["image"] = adapter(pixel_values, preserve_ids=image_preserve_ids)
            else:
                adapted["audio"] = adapter(input_values, padding_mask, preserve_ids=audio_preserve_ids)
        encoded, _, _ = self.encoder(adapted, **kwargs)

        result = {}
        for modality in modalities:
            result[f"{modality}_encoder_last_hidden_state"] = encoded[modality]
            result[f"{modality}_encoder_padding_mask"] = adapted[modality].padding_mask

        masked = any(preserve[m] is not None for m in modalities)
        if not masked and len(modalities) == 1:
            modality = modalities[0]
            result[f"{modality}_embeds"] = F.normalize(self._project_cls(modality, encoded[modality]), dim=-1)
        if masked:
            decoder_inputs = {}
            for modality in modalities:
                if modality not in self.mask_tokens:
                    raise ValueError(f"The decoder has no {modality} branch ({self.decoder_config.modalities}).")
                full_mask = self._full_padding_mask(
                    modality, input_ids, attention_mask, pixel_values, input_values, padding_mask
                )
                length = full_mask.shape[1]
                kept = self.decoder_embed[modality](encoded[modality])
                ids = preserve[modality]
                if ids is None:
                    ids = torch.arange(length, device=kept.device)[None].expand(kept.shape[0], -1)
                embeddings = scatter_kept(self.mask_tokens[modality], kept, ids, length)
                embeddings = embeddings + self.decoder_positions[modality](length)
                decoder_inputs[modality] = AdapterOutput(embeddings=embeddings, padding_mask=full_mask)
                result[f"{modality}_padding_mask"] = full_mask
            # The decoder follows the encoder's attention implementation. Quirk of the original kept on purpose: the
            # decoder has no relative bias, so nothing masks its padded keys; they only start from zero. Queries of a
            # padded clip then attend to many identical padding rows, which makes their float32 outputs depend on the
            # kernel's summation order at the 1e-5 level (see tests/test_pretraining.py).
            self.decoder_config._attn_implementation = self.config._attn_implementation
            decoded, _, _ = self.decoder(decoder_inputs, **kwargs)
            for modality in modalities:
                result[f"{modality}_decoder_output"] = self.mask_heads[modality](decoded[modality])

        output = OnePeaceForPretrainingOutput(**result)
        return output if return_dict else output.to_tuple()


__all__ = ["OnePeaceForPretraining", "OnePeaceForPretrainingOutput"]
