"""Conversion of original (fairseq) ONE-PEACE checkpoints: config derivation, the key map, the conversion itself.

Reading the files safely and lazily is `original_checkpoint`'s job; writing shards and the checksum manifest is
`sharded_safetensors`'; checking outputs against recorded ones is `output_verification`'s.
"""

import ast
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils.logging import tqdm  # off with transformers' disable_progress_bar()

from .configuration_onepeace import (
    DEFAULT_AUDIO_CONV_SPEC,
    OnePeaceConfig,
    OnePeaceVisionConfig,
    longest_audio_samples,
)
from .converted_folder import conversion_files
from .original_checkpoint import (
    CHECKPOINT_KINDS,
    CLASSIFY,
    PRETRAIN,
    RETRIEVAL,
    VISION,
    CheckpointConversionError,
    LazyTensor,
    checkpoint_kind,
    load_original_checkpoint,
    materialize,
    read_original_checkpoint,
)


# Head types of classification checkpoints this converter supports (one task model each).
SUPPORTED_CLASSIFY_HEAD_TYPES = ("image", "audio", "vl", "al")
# Classification checkpoints whose task gives the head another meaning: the original's RefCOCO task reads the four
# outputs as a sigmoid box, its AQA task ranks one score per candidate answer.
GROUNDING_TASKS = ("refcoco",)
MULTIPLE_CHOICE_TASKS = ("aqa",)

__all__ = [
    "CheckpointConversionError", "checkpoint_kind", "config_from_checkpoint", "convert_checkpoint",
    "convert_state_dict", "load_original_checkpoint", "read_original_checkpoint",
]


def parse_conv_spec(spec: str) -> list[list[int]]:
    """Evaluate a feature-encoder spec such as "[(512, 10, 5)] + [(512, 3, 2)] * 4" without `eval`."""

    def evaluate(node):
        if isinstance(node, ast.Expression):
            return evaluate(node.body)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [evaluate(e) for e in node.elts]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return evaluate(node.left) + evaluate(node.right)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            return evaluate(node.left) * evaluate(node.right)
        raise CheckpointConversionError(f"Unsupported feature_encoder_spec {spec!r}.")

    return [list(layer) for layer in evaluate(ast.parse(spec, mode="eval"))]


def _modalities(kind: str, encoder: dict, task: dict) -> list[str]:
    if kind == PRETRAIN:
        return [m for m in ("text", "image", "audio") if encoder[f"use_{m}_moe"]]
    # Retrieval and classification models overwrite the stored flags from the task's head type when built.
    head_type = task["head_type"]
    branches = {"text": "text", "image": "image", "audio": "audio", "vl": "text image", "al": "text audio",
                "val": "text image audio"}
    if head_type not in branches:
        raise CheckpointConversionError(f"Unknown head_type {head_type!r}.")
    return branches[head_type].split()


def config_from_checkpoint(checkpoint: dict, task: str = "encoder") -> OnePeaceConfig:
    """Derive the config from the stored cfg, honouring what the original changes at build time.

    task: "encoder" (the encoder model) or "pretraining" (also the denoising decoder: `decoder_config` is set).
    """
    kind = checkpoint_kind(checkpoint)
    if kind not in CHECKPOINT_KINDS:
        raise CheckpointConversionError(f"Unknown checkpoint kind {kind!r}; supported: {CHECKPOINT_KINDS}.")
    _check_task(task, kind)
    if kind == VISION:
        return vision_config_from_tensors(checkpoint["model"])
    try:
        return _config_from_cfg(checkpoint, task == "pretraining", kind)
    except KeyError as error:
        raise CheckpointConversionError(
            f"The checkpoint's cfg lacks the field {error.args[0]!r} this conversion reads: it was not saved by the "
            "original ONE-PEACE code, or by a version this converter does not know."
        ) from None


def _config_from_cfg(checkpoint: dict, keep_decoder: bool, kind: str) -> OnePeaceConfig:
    cfg = checkpoint["cfg"]
    model_cfg, task = cfg["model"], cfg["task"]
    encoder = model_cfg["encoder"]
    text, image, audio = encoder["text_adapter"], encoder["image_adapter"], encoder["audio_adapter"]
    state = checkpoint["model"]

    head_config = _classification_head_config(model_cfg, task, cfg.get("criterion") or {}) if kind == CLASSIFY else {}
    image_rel_bucket_size = image["rel_bucket_size"]
    if kind != PRETRAIN:
        image_rel_bucket_size = task["patch_image_size"] // 16
    if image["vision_encoder_type"] not in ("hmlp", "mlp"):
        raise CheckpointConversionError(f"Encoder image stem {image['vision_encoder_type']!r} is not supported.")
    # Classification models always build one table per layer; retrieval models only with copy_rel_pos_table.
    per_layer = kind == CLASSIFY or (
        kind == RETRIEVAL and bool(model_cfg.get("copy_rel_pos_table", False))
    )
    audio_spec = audio.get("feature_encoder_spec")
    vocab_key = "encoder_wrapper.text_adapter.embed_tokens.weight"
    logit_scale_init = model_cfg.get("logit_scale_init", 1 / 0.07)

    return OnePeaceConfig(
        hidden_size=encoder["embed_dim"],
        intermediate_size=encoder["ffn_embed_dim"],
        num_hidden_layers=encoder["layers"],
        num_attention_heads=encoder["attention_heads"],
        modalities=_modalities(kind, encoder, task),
        hidden_dropout=encoder["dropout"],
        attention_dropout=encoder["attention_dropout"],
        activation_dropout=encoder["activation_dropout"],
        drop_path_rate=encoder["drop_path_rate"],
        magneto_scale_attn=encoder["magneto_scale_attn"],
        scale_attn=encoder["scale_attn"],
        scale_fc=encoder["scale_fc"],
        scale_heads=encoder["scale_heads"],
        use_layer_scale=encoder["use_layer_scale"],
        layer_scale_init_value=float(encoder["layer_scale_init_value"]),
        rel_pos_table_per_layer=per_layer,
        vocab_size=state[vocab_key].shape[0] if vocab_key in state else 50264,
        text_rel_bucket_size=text["bucket_size"],
        text_use_rel_bias=text["use_attn_bias"],
        image_size=task.get("patch_image_size", 256),
        image_stem="hmlp" if image["vision_encoder_type"] == "hmlp" else "conv",
        image_pos_grid_size=image["bucket_size"],
        image_rel_bucket_size=image_rel_bucket_size,
        image_use_rel_bias=image["use_attn_bias"],
        audio_conv_spec=parse_conv_spec(audio_spec) if audio_spec else None,
        audio_conv_bias=audio["conv_bias"],
        audio_pos_type=audio["abs_pos_type"],
        audio_conv_pos_depth=audio["conv_pos_depth"],
        audio_conv_pos_width=audio["conv_pos_width"],
        audio_conv_pos_groups=audio["conv_pos_groups"],
        audio_conv_pos_pre_ln=audio["conv_pos_pre_ln"],
        audio_rel_bucket_size=audio["bucket_size"],
        audio_use_rel_bias=audio["use_attn_bias"],
        audio_max_samples=_audio_max_samples(task, parse_conv_spec(audio_spec) if audio_spec else None),
        logit_scale_init_value=math.log(logit_scale_init),
        decoder_config=_decoder_config(model_cfg) if keep_decoder else None,
        **head_config,
    )


def _audio_max_samples(task: dict, conv_spec: list[list[int]] | None) -> int:
    """The task's longest clip, cut to what the relative positions hold (the original fails beyond them)."""
    longest = longest_audio_samples(conv_spec or DEFAULT_AUDIO_CONV_SPEC, OnePeaceConfig.max_relative_positions)
    return min(16000 * int(task.get("max_duration", 15)), longest)


def _classification_head_config(model_cfg: dict, task: dict, criterion: dict) -> dict:
    """Head fields of a one_peace_classify checkpoint; refuses the variants no task model implements."""
    head_type, task_name = task.get("head_type"), task.get("_name")
    if head_type not in SUPPORTED_CLASSIFY_HEAD_TYPES:
        raise CheckpointConversionError(
            f"Classification checkpoints with head_type {head_type!r} are not supported yet "
            f"(supported: {', '.join(SUPPORTED_CLASSIFY_HEAD_TYPES)})."
        )
    two_images = bool(task.get("use_two_images", False))
    if two_images and head_type != "vl":
        raise CheckpointConversionError(f"use_two_images needs head_type 'vl', got {head_type!r}.")
    num_classes = int(task["num_classes"])
    if task_name in GROUNDING_TASKS and (head_type != "vl" or num_classes != 4 or two_images):
        raise CheckpointConversionError(
            f"A {task_name} checkpoint must have head_type 'vl', num_classes 4 and one image; got {head_type!r}, "
            f"{num_classes}, use_two_images={two_images}."
        )
    if task_name in MULTIPLE_CHOICE_TASKS and (head_type != "al" or num_classes != 1):
        raise CheckpointConversionError(
            f"A {task_name} checkpoint must have head_type 'al' and num_classes 1; got {head_type!r}, {num_classes}."
        )
    encoder = model_cfg["encoder"]
    branches = _modalities(CLASSIFY, encoder, task)
    for branch in branches:
        adapter = encoder[f"{branch}_adapter"]
        if adapter.get("layernorm_embedding", False):
            raise CheckpointConversionError(f"A {branch} adapter with layernorm_embedding is not supported.")
    type_flags = [bool(encoder[f"{branch}_adapter"].get("add_type_embedding", False)) for branch in branches]
    if any(type_flags) and not all(type_flags):
        raise CheckpointConversionError(
            f"add_type_embedding must be set on all of the {branches} adapters or none, got {type_flags}."
        )
    config = {
        "classifier_pooling": "attention" if model_cfg.get("attn_pooling", False) else "cls",
        "classifier_use_pooler": bool(model_cfg.get("use_pooler", False)),
        "classifier_dropout": float(model_cfg.get("pooler_dropout", 0.0)),
        "classifier_head_scale_ratio": model_cfg.get("head_scale_ratio", 1),
        "classifier_two_images": two_images,
        "classifier_type_embeddings": all(type_flags),
    }
    if len(branches) > 1:
        # use_image_features makes the head read the non-text part of the fused sequence (audio for 'al').
        config["classifier_pool_text"] = not bool(model_cfg.get("use_image_features", False))
    if task_name not in GROUNDING_TASKS:  # the box head has four outputs whatever num_labels says
        config["num_labels"] = num_classes
    if criterion.get("use_multi_label", False):  # FSD50K, VQA: sigmoid scores, as the model was fine-tuned
        config["problem_type"] = "multi_label_classification"
    return config


# Original key (after the `encoder_wrapper.` prefix for encoder keys) -> our key. Patterns are tried in order.
_M = r"(text|image|audio)"
KEY_MAP = [
    (rf"^encoder_wrapper\.{_M}_adapter\.rel_pos_table_list\.(\d+)\.weight$", r"adapters.\1.rel_pos.tables.\2.weight"),
    (r"^encoder_wrapper\.text_adapter\.(embed_tokens|embed_positions)\.weight$", r"adapters.text.\1.weight"),
    (rf"^encoder_wrapper\.{_M}_adapter\.cls_embedding$",                        r"adapters.\1.cls_embedding"),
    (r"^encoder_wrapper\.image_adapter\.pos_embed$",                             r"adapters.image.pos_embed"),
    (r"^encoder_wrapper\.image_adapter\.embed_images\.([036])\.(weight|bias)$",  r"adapters.image.patch_embed.layers.\1.\2"),
    (r"^encoder_wrapper\.image_adapter\.embed_images\.([14])\.layer_norm\.(weight|bias)$",
                                                                                 r"adapters.image.patch_embed.layers.\1.\2"),
    (r"^encoder_wrapper\.image_adapter\.embed_images\.weight$",                  r"adapters.image.patch_embed.weight"),
    (r"^encoder_wrapper\.audio_adapter\.embed_audios\.0\.conv_layers\.(\d+)\.0\.(weight|bias)$",
                                                                                 r"adapters.audio.feature_encoder.conv_layers.\1.0.\2"),
    (r"^encoder_wrapper\.audio_adapter\.embed_audios\.0\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$",
                                                                                 r"adapters.audio.feature_encoder.conv_layers.\1.1.\2"),
    (r"^encoder_wrapper\.audio_adapter\.embed_audios\.2\.(weight|bias)$",       r"adapters.audio.feature_encoder.layer_norm.\1"),
    (r"^encoder_wrapper\.audio_adapter\.embed_audios\.3\.(weight|bias)$",       r"adapters.audio.feature_encoder.projection.\1"),
    (r"^encoder_wrapper\.audio_adapter\.cls_pos_embed$",                         r"adapters.audio.cls_pos_embed"),
    (r"^encoder_wrapper\.audio_adapter\.embed_positions\.weight$",               r"adapters.audio.embed_positions.weight"),
    (r"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.gamma_([12])$",            r"encoder.layers.\1.gamma_\2"),
    (r"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.self_attn\.ln\.(weight|bias)$",
                                                                                 r"encoder.layers.\1.self_attn.inner_layer_norm.\2"),
    (r"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.self_attn\.c_attn$",       r"encoder.layers.\1.self_attn.head_scale"),
    (r"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)$",
                                                                                 r"encoder.layers.\1.self_attn.\2.\3"),
    (r"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.(self_attn_layer_norm|final_layer_norm)\.(weight|bias)$",
                                                                                 r"encoder.layers.\1.\2.\3"),
    (r"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.attn_ln\.(weight|bias)$", r"encoder.layers.\1.attn_layer_norm.\2"),
    (rf"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.{_M}_ffn\.0\.wi_0\.weight$", r"encoder.layers.\1.ffn.\2.gate_proj.weight"),
    (rf"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.{_M}_ffn\.0\.wi_1\.weight$", r"encoder.layers.\1.ffn.\2.up_proj.weight"),
    (rf"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.{_M}_ffn\.2\.(weight|bias)$", r"encoder.layers.\1.ffn.\2.sub_layer_norm.\3"),
    (rf"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.{_M}_ffn\.3\.(weight|bias)$", r"encoder.layers.\1.ffn.\2.down_proj.\3"),
    (rf"^encoder_wrapper\.fusion_model\.{_M}_layer_norm\.(weight|bias)$",      r"encoder.final_layer_norms.\1.\2"),
    (rf"^{_M}_proj\.(weight|bias)$",                                           r"projections.\1.\2"),
    (r"^logit_scale$",                                                          r"logit_scale"),
    (rf"^encoder_wrapper\.{_M}_adapter\.type_embedding$",                      r"type_embeddings.\1"),
    (r"^encoder_wrapper\.image_adapter\.type_embedding_2$",                     r"type_embeddings.image_2"),
    (r"^classify_head\.attn_pooling_func\.q$",                                   r"classification_head.attention_pooling.query"),
    (r"^classify_head\.attn_pooling_func\.(k_proj|v_proj|out_proj)\.(weight|bias)$",
                                                                                 r"classification_head.attention_pooling.\1.\2"),
    (r"^classify_head\.(norm|pooler\.1|classifier\.[013])\.(weight|bias)$",     r"classification_head.\1.\2"),
]

# Keys the encoder model does not use: index buffers we recompute (checked), the pretraining decoder and its
# heads (kept by the pretraining model of a later issue), and the audio mask embedding the encoder never reads.
DROPPED_KEYS = [
    r"^encoder_wrapper\.(text|image|audio)_adapter\.(rp_bucket|position_idx)$",
    r"^encoder_wrapper\.fusion_model\.version$",
    r"^encoder_wrapper\.audio_adapter\.mask_embedding$",
    r"^decoder_wrapper\.",
    r"^(text|image|audio)_mask_token$",
    r"^decoder_(text|image|audio)_embed\.",
    r"^(text|image|audio)_mask_head\.",
]


TASKS = ("encoder", "pretraining")

# Pretraining decoder and heads (kept with task="pretraining"): original key -> key of OnePeaceForPretraining. The
# decoder's fusion layers use the encoder's layer table with the other prefixes.
DECODER_KEY_MAP = [
    (r"^decoder_wrapper\.text_adapter\.embed_positions\.weight$",  r"decoder_positions.text.embed_positions.weight"),
    (r"^decoder_wrapper\.image_adapter\.pos_embed$",                r"decoder_positions.image.pos_embed"),
    (r"^decoder_wrapper\.audio_adapter\.embed_positions\.weight$", r"decoder_positions.audio.embed_positions.weight"),
    (rf"^{_M}_mask_token$",                                         r"mask_tokens.\1"),
    (rf"^decoder_{_M}_embed\.(weight|bias)$",                       r"decoder_embed.\1.\2"),
    (rf"^{_M}_mask_head\.(weight|bias)$",                           r"mask_heads.\1.\2"),
] + [
    (pattern.replace(r"^encoder_wrapper\.fusion_model", r"^decoder_wrapper\.fusion_model"), "decoder" + target[7:])
    for pattern, target in KEY_MAP
    if pattern.startswith(r"^encoder_wrapper\.fusion_model") and target.startswith("encoder.")
]

# With task="pretraining": what is still dropped. The decoder adapters' `cls_embedding` and the decoder audio
# `mask_embedding` are never read by the original's decoder (it adds no CLS embedding); the encoder audio
# `mask_embedding` is unused as well; index buffers are recomputed.
PRETRAINING_DROPPED_KEYS = [
    r"^(encoder|decoder)_wrapper\.(text|image|audio)_adapter\.(rp_bucket|position_idx)$",
    r"^(encoder|decoder)_wrapper\.fusion_model\.version$",
    r"^(encoder|decoder)_wrapper\.audio_adapter\.mask_embedding$",
    r"^decoder_wrapper\.(text|image|audio)_adapter\.cls_embedding$",
]


def _check_task(task: str, kind: str):
    if task not in TASKS:
        raise CheckpointConversionError(f"task must be one of {TASKS}, got {task!r}.")
    if task == "pretraining" and kind != PRETRAIN:
        raise CheckpointConversionError(
            f"task='pretraining' needs a one_peace_pretrain checkpoint (with the decoder), got {kind!r}."
        )


def _decoder_config(model_cfg: dict) -> dict:
    """`decoder_config` of OnePeaceConfig from the stored decoder section; refuses what the decoder cannot be."""
    decoder, encoder = model_cfg["decoder"], model_cfg["encoder"]
    text, image, audio = decoder["text_adapter"], decoder["image_adapter"], decoder["audio_adapter"]
    modalities = [m for m in ("text", "image", "audio") if decoder[f"use_{m}_moe"] and encoder[f"use_{m}_moe"]]
    for name, adapter in (("text", text), ("image", image), ("audio", audio)):
        if name in modalities and adapter["use_attn_bias"]:
            raise CheckpointConversionError(f"A decoder {name} adapter with use_attn_bias is not supported.")
    if "audio" in modalities and audio["abs_pos_type"] != "fixed":
        raise CheckpointConversionError(f"Decoder audio abs_pos_type {audio['abs_pos_type']!r} is not supported.")
    return {
        "hidden_size": decoder["embed_dim"],
        "intermediate_size": decoder["ffn_embed_dim"],
        "num_hidden_layers": decoder["layers"],
        "num_attention_heads": decoder["attention_heads"],
        "modalities": modalities,
        "hidden_dropout": decoder["dropout"],
        "attention_dropout": decoder["attention_dropout"],
        "activation_dropout": decoder["activation_dropout"],
        "drop_path_rate": decoder["drop_path_rate"],
        "magneto_scale_attn": decoder["magneto_scale_attn"],
        "scale_attn": decoder["scale_attn"],
        "scale_fc": decoder["scale_fc"],
        "scale_heads": decoder["scale_heads"],
        "use_layer_scale": decoder["use_layer_scale"],
        "layer_scale_init_value": float(decoder["layer_scale_init_value"]),
        "image_pos_grid_size": image["bucket_size"],
    }


def _audio_positions_key(key: str, config: OnePeaceConfig) -> str | None:
    """The conv positional embedding is a Sequential whose indices shift with the optional pre-LayerNorm."""
    match = re.match(r"^encoder_wrapper\.audio_adapter\.embed_positions\.(\d+)(?:\.(\d+))?\.0\.(weight|bias)$", key)
    if config.audio_conv_pos_pre_ln:
        pre = re.match(r"^encoder_wrapper\.audio_adapter\.embed_positions\.0\.(weight|bias)$", key)
        if pre:
            return f"adapters.audio.conv_pos_embed.pre_layer_norm.{pre.group(1)}"
        if match and match.group(1) == "1" and match.group(2) is not None:
            return f"adapters.audio.conv_pos_embed.convs.{int(match.group(2)) - 1}.{match.group(3)}"
        return None
    if match and match.group(2) is None:
        return f"adapters.audio.conv_pos_embed.convs.{int(match.group(1)) - 1}.{match.group(3)}"
    return None


# The vision branch renamed the pretraining keys (`convert_to_vision.py` of the original): these undo the renaming,
# so that the vision pickle goes through the same key map as every other checkpoint.
VISION_KEY_PREFIXES = [
    (r"^image_adapter\.", "encoder_wrapper.image_adapter."),
    (r"^encoder\.layers\.", "encoder_wrapper.fusion_model.layers."),
]


def _vision_key_as_original(key: str) -> str:
    for pattern, prefix in VISION_KEY_PREFIXES:
        if re.match(pattern, key):
            return re.sub(pattern, prefix, key)
    return key


def map_original_keys(keys, config: OnePeaceConfig, task: str = "encoder") -> tuple[dict[str, str], list[str]]:
    """Our key for each original key (`{ours: original}`), and the original keys nothing maps; drops unused ones."""
    if task not in TASKS:
        raise CheckpointConversionError(f"task must be one of {TASKS}, got {task!r}.")
    dropped_keys = DROPPED_KEYS if task == "encoder" else PRETRAINING_DROPPED_KEYS
    key_map = KEY_MAP if task == "encoder" else KEY_MAP + DECODER_KEY_MAP
    names, unexpected = {}, []
    for key in tqdm(keys, desc="Mapping weights", disable=None):
        if any(re.match(pattern, key) for pattern in dropped_keys):
            continue
        new_key = _audio_positions_key(key, config)
        if new_key is None:
            for pattern, replacement in key_map:
                if re.match(pattern, key):
                    new_key = re.sub(pattern, replacement, key)
                    break
        if new_key is None:
            unexpected.append(key)
        else:
            names[new_key] = key
    return names, unexpected


def convert_state_dict(
    original: dict[str, torch.Tensor | LazyTensor],
    config: OnePeaceConfig,
    expected: set[str] | dict[str, torch.Size] | None = None,
    task: str = "encoder",
) -> dict[str, torch.Tensor | LazyTensor]:
    """Map original keys to ours; refuse (listing the keys) anything unknown, missing or of the wrong shape.

    expected: the model's keys, or its keys and shapes (then shapes are checked too).
    task: "encoder" drops the pretraining decoder and heads; "pretraining" keeps them (OnePeaceForPretraining keys).
    Lazy tensors stay lazy: the result maps our keys to the same objects.
    """
    if isinstance(config, OnePeaceVisionConfig):
        original = {_vision_key_as_original(key): tensor for key, tensor in original.items()}
    names, unexpected = map_original_keys(original, config, task)
    converted = {new_key: original[key] for new_key, key in names.items()}
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {sorted(unexpected)}")
    if expected is not None:
        missing = sorted(set(expected) - converted.keys())
        extra = sorted(converted.keys() - set(expected))
        if missing:
            problems.append(f"missing keys: {missing}")
        if extra:
            problems.append(f"keys the model does not have (branch disabled in the config?): {extra}")
        if isinstance(expected, dict):
            wrong = [
                f"{key} {tuple(converted[key].shape)} (model: {tuple(expected[key])})"
                for key in sorted(converted.keys() & expected.keys())
                if tuple(converted[key].shape) != tuple(expected[key])
            ]
            if wrong:
                problems.append(f"shapes that differ: {wrong}")
    if problems:
        raise CheckpointConversionError("Cannot convert the checkpoint faithfully; " + "; ".join(problems))
    _check_index_buffers(original, config)
    return converted


def _check_index_buffers(original: dict[str, torch.Tensor | LazyTensor], config: OnePeaceConfig):
    """The stored relative-position index tables must equal the ones the model recomputes."""
    from .attention import image_relative_buckets, token_relative_buckets

    expected = {
        "text": lambda: token_relative_buckets(config.text_rel_bucket_size, config.max_relative_positions),
        "audio": lambda: token_relative_buckets(config.audio_rel_bucket_size, config.max_relative_positions),
        "image": lambda: image_relative_buckets(config.image_rel_bucket_size, config.image_rel_bucket_size),
    }
    for modality in config.modalities:
        stored = original.get(f"encoder_wrapper.{modality}_adapter.rp_bucket")
        if stored is None:
            continue
        if getattr(config, f"{modality}_use_rel_bias") and not torch.equal(materialize(stored), expected[modality]()):
            raise CheckpointConversionError(
                f"The stored {modality} relative-position index table differs from the one this model computes."
            )


def vision_config_from_tensors(tensors: dict[str, torch.Tensor | LazyTensor]) -> OnePeaceVisionConfig:
    """The vision branch stores no config: its sizes and options are read off the tensor names and shapes."""

    def shape(key):
        if key not in tensors:
            raise CheckpointConversionError(f"The vision checkpoint has no {key}; cannot infer its architecture.")
        return tuple(tensors[key].shape)

    layer_ids = {int(m.group(1)) for key in tensors if (m := re.match(r"^encoder\.layers\.(\d+)\.", key))}
    if not layer_ids or layer_ids != set(range(len(layer_ids))):
        raise CheckpointConversionError(f"The vision checkpoint's layers are not numbered 0..n-1: {sorted(layer_ids)}.")
    layer = "encoder.layers.0."
    if layer + "image_ffn.3.weight" not in tensors:
        raise CheckpointConversionError("Vision checkpoints without the FFN sub-LayerNorm (scale_fc) are not supported.")
    positions, hidden = shape("image_adapter.pos_embed")
    tables = sorted(key for key in tensors if re.match(r"^image_adapter\.rel_pos_table_list\.\d+\.weight$", key))
    if not tables:
        raise CheckpointConversionError("The vision checkpoint has no relative-position table: its heads are unknown.")
    rows, heads = shape(tables[0])
    rel_bucket_size = (math.isqrt(rows - 3) + 1) // 2
    grid = math.isqrt(positions - 1)
    if (2 * rel_bucket_size - 1) ** 2 + 3 != rows or grid * grid + 1 != positions:
        raise CheckpointConversionError(f"Unexpected image position tables: {rows} relative rows, {positions} absolute.")
    if "image_adapter.embed_images.6.weight" in tensors:
        stem = "hmlp"
    elif "image_adapter.embed_images.weight" in tensors:
        stem = "conv"
    else:
        raise CheckpointConversionError("The vision checkpoint's image stem is neither hmlp nor a single conv.")
    return OnePeaceVisionConfig(
        hidden_size=hidden,
        intermediate_size=shape(layer + "image_ffn.0.wi_0.weight")[0],
        num_hidden_layers=len(layer_ids),
        num_attention_heads=heads,
        magneto_scale_attn=layer + "self_attn.ln.weight" in tensors,
        scale_attn=layer + "attn_ln.weight" in tensors,
        scale_fc=True,
        scale_heads=layer + "self_attn.c_attn" in tensors,
        use_layer_scale=layer + "gamma_1" in tensors,
        rel_pos_table_per_layer=len(tables) > 1,
        image_size=16 * rel_bucket_size,
        image_stem=stem,
        image_pos_grid_size=grid,
        image_rel_bucket_size=rel_bucket_size,
        image_use_rel_bias=True,
        drop_path_rate=0.0,
    )


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_processor(config: OnePeaceConfig, lowercase_text: bool = True):
    """The processor every original checkpoint was trained with: GPT-2 BPE, CLIP-normalized images, 16 kHz audio.

    The vision branch (images only) gets the image processor alone. lowercase_text: False for the checkpoints whose
    fine-tuning data kept the case (see `lowercases_text`).
    """
    from .feature_extraction_onepeace import OnePeaceFeatureExtractor
    from .image_processing_onepeace import OnePeaceImageProcessor
    from .processing_onepeace import OnePeaceProcessor
    from .tokenization_onepeace import OnePeaceTokenizer

    image_processor = OnePeaceImageProcessor(size={"height": config.image_size, "width": config.image_size})
    if isinstance(config, OnePeaceVisionConfig):
        return image_processor
    return OnePeaceProcessor(
        tokenizer=OnePeaceTokenizer(do_lower_case=lowercase_text),
        image_processor=image_processor,
        feature_extractor=OnePeaceFeatureExtractor(sampling_rate=config.audio_sampling_rate),
    )


def lowercases_text(checkpoint: dict) -> bool:
    """Whether the checkpoint's training data lowercased its text: the original's datasets all do, except audio
    question answering's (AQA questions and answers are encoded with their case)."""
    task_name = checkpoint.get("cfg", {}).get("task", {}).get("_name")
    return checkpoint_kind(checkpoint) != CLASSIFY or task_name not in MULTIPLE_CHOICE_TASKS


def target_model_classes(checkpoint: dict, config: OnePeaceConfig, task: str = "encoder") -> tuple[type, type]:
    """The model class a checkpoint converts to and the class that must reload it (an Auto class where one fits)."""
    from transformers import (
        AutoModel,
        AutoModelForAudioClassification,
        AutoModelForImageClassification,
        AutoModelForVisualQuestionAnswering,
    )

    from .modeling_onepeace import OnePeaceModel, OnePeaceVisionModel
    from .modeling_onepeace_pretraining import OnePeaceForPretraining
    from .modeling_onepeace_tasks import (
        OnePeaceForAudioClassification,
        OnePeaceForAudioLanguageClassification,
        OnePeaceForAudioLanguageMultipleChoice,
        OnePeaceForImageClassification,
        OnePeaceForVisionLanguageClassification,
        OnePeaceForVisualGrounding,
    )

    kind = checkpoint_kind(checkpoint)
    if task == "pretraining":
        return OnePeaceForPretraining, OnePeaceForPretraining
    if kind == VISION:
        return OnePeaceVisionModel, AutoModel
    if kind != CLASSIFY:
        return OnePeaceModel, AutoModel
    task_name = checkpoint["cfg"]["task"].get("_name")
    if config.modalities == ["image"]:
        return OnePeaceForImageClassification, AutoModelForImageClassification
    if config.modalities == ["audio"]:
        return OnePeaceForAudioClassification, AutoModelForAudioClassification
    if config.modalities == ["text", "image"]:
        if task_name in GROUNDING_TASKS:
            return OnePeaceForVisualGrounding, OnePeaceForVisualGrounding
        return OnePeaceForVisionLanguageClassification, AutoModelForVisualQuestionAnswering
    if task_name in MULTIPLE_CHOICE_TASKS:
        return OnePeaceForAudioLanguageMultipleChoice, OnePeaceForAudioLanguageMultipleChoice
    return OnePeaceForAudioLanguageClassification, OnePeaceForAudioLanguageClassification


@dataclass
class ConversionResult:
    """What `convert_checkpoint` made: the folder, its config and class, and the output check if one was asked."""

    output_dir: Path
    kind: str
    config: OnePeaceConfig
    model_class: type
    files: list[str]
    verification: "VerificationReport | None" = None


class OutputFolderError(CheckpointConversionError):
    """The output folder cannot take the conversion (a file, or a previous one without overwrite)."""


# The hidden folder a conversion is built in, inside the output folder (see `_staging_dir`).
STAGING_PREFIX = ".onepeace-converting-"


def _check_output_dir(output_dir: Path, overwrite: bool):
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputFolderError(f"{output_dir} is a file; the output must be a folder.")
    # A staging folder left by a killed conversion does not count as content.
    if output_dir.exists() and not overwrite and any(
        not path.name.startswith(STAGING_PREFIX) for path in output_dir.iterdir()
    ):
        raise OutputFolderError(
            f"{output_dir} is not empty; choose a new folder or pass overwrite=True (--overwrite) to replace a "
            "previous conversion there."
        )
    existing = next(parent for parent in (output_dir.absolute(), *output_dir.absolute().parents) if parent.exists())
    if not existing.is_dir():
        raise OutputFolderError(f"{output_dir} cannot be made: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(f"{output_dir} cannot be written: no write permission in {existing}.")


def _staging_dir(output_dir: Path) -> Path:
    """A hidden folder inside the output folder to build the conversion in: the files users load change only once
    everything was written and checked, so a failed or interrupted conversion leaves them as they were. Hidden
    names are skipped by the checksum manifest and by Hub pushes."""
    output_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir))


def _move_into_place(staging: Path, output_dir: Path):
    """Replace the previous conversion's files by the staged ones; files a conversion does not write stay."""
    staged = {path.name for path in staging.iterdir()}
    for name in set(conversion_files(output_dir)) - staged:
        (output_dir / name).unlink()
    for name in sorted(staged):
        os.replace(staging / name, output_dir / name)
    staging.rmdir()


def convert_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
    task: str = "encoder",
    kind: str | None = None,
    expected_outputs: str | Path | None = None,
    expected_inputs: str | Path | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    model_card: bool = True,
    repo_id: str | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
    revision: str | None = None,
) -> ConversionResult:
    """Convert an original checkpoint into a transformers folder, shard by shard, and check what was written.

    kind: what the file must be (one of `CHECKPOINT_KINDS`); detected from the file when None.
    task: "pretraining" keeps the denoising decoder of a pretraining checkpoint (OnePeaceForPretraining).
    expected_outputs / expected_inputs / atol / rtol: outputs recorded with the original code (see
        `output_verification`); the conversion fails if the converted model's outputs differ by more than that.
    model_card / repo_id / revision / base_model: write README.md, whose usage examples load `repo_id` (default: the
        folder's name) at `revision` (the branch it is pushed to, when not the default); a fine-tuned model's card
        names `base_model` (the Hub id of the converted pretrained model).
    Every written tensor is compared bit-exact with its source, the folder reloads through its Auto class with no
    missing or unexpected key, and a SHA256SUMS manifest covering every file is written last. The files are built
    in a hidden subfolder and moved into place only once checked: a failed or interrupted conversion leaves
    `output_dir` as it was (a previous conversion there included). With overwrite=True the files of a previous
    conversion are replaced; other files in the folder are kept.
    """
    from .remote_code import add_remote_code
    from .sharded_safetensors import write_checksum_manifest, write_sharded_safetensors

    if dtype not in DTYPES:
        raise CheckpointConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    torch_dtype = DTYPES[dtype]
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)  # before reading a checkpoint of many GB
    if model_card and base_model is not None:
        _check_hub_id(base_model, "base_model")
    checkpoint = read_original_checkpoint(checkpoint_path, kind)
    config = config_from_checkpoint(checkpoint, task)
    model_class, auto_class = target_model_classes(checkpoint, config, task)
    config.architectures = [model_class.__name__]
    config.dtype = torch_dtype
    with torch.device("meta"):
        model_state = model_class(config).state_dict()
    state = convert_state_dict(checkpoint["model"], config, {k: v.shape for k, v in model_state.items()}, task)

    if expected_outputs is not None:  # a missing or wrong record fails before anything is written
        from .output_verification import read_recorded_inputs

        read_recorded_inputs(expected_outputs, expected_inputs)
    created = not output_dir.exists()
    staging = _staging_dir(output_dir)
    try:
        plan = {
            key: (torch.empty(source.shape, dtype=_saved_dtype(source.dtype, torch_dtype), device="meta"),
                  lambda key=key, source=source: _cast(materialize(source), torch_dtype, key))
            for key, source in ((key, state[key]) for key in model_state)
        }
        write_sharded_safetensors(plan, staging, max_shard_size)
        config.save_pretrained(staging)
        default_processor(config, lowercases_text(checkpoint)).save_pretrained(staging)
        add_remote_code(staging, model_class)
        verify_converted(staging, state, torch_dtype, auto_class)

        result = ConversionResult(output_dir, checkpoint_kind(checkpoint), config, model_class, [])
        if expected_outputs is not None:
            from .modeling_onepeace import OnePeaceModel
            from .output_verification import verify_outputs

            check_class = OnePeaceModel if task == "pretraining" else auto_class
            result.verification = verify_outputs(check_class.from_pretrained(staging), expected_outputs,
                                                 expected_inputs, atol, rtol)
        if model_card:
            from .model_card import render_converted_card

            card_options = {"repo_id": repo_id, "revision": revision}
            if base_model:
                card_options["base_model"] = base_model
            card = render_converted_card(result, Path(checkpoint_path).name, dtype, **card_options)
            card.save(staging / "README.md")
        _move_into_place(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the conversion succeeded
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
    write_checksum_manifest(output_dir)  # last, so that a folder with a manifest is a complete one
    result.files = sorted(path.name for path in output_dir.iterdir() if path.is_file())
    return result


def _check_hub_id(model_id: str, what: str):
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model_id)
    except HFValidationError as error:
        raise CheckpointConversionError(f"{what} {model_id!r} is not a Hub model id: {error}") from None


def _saved_dtype(source: torch.dtype, target: torch.dtype) -> torch.dtype:
    return target if source.is_floating_point else source


def _cast(tensor: torch.Tensor, target: torch.dtype, name: str | None = None) -> torch.Tensor:
    """The tensor in the saved dtype; with `name`, refuse a cast that turns finite values infinite (fp16's range
    ends at 65504), which the bit-exact check against the cast source could not notice."""
    cast = tensor.to(_saved_dtype(tensor.dtype, target))
    if name is not None and cast.is_floating_point() and not torch.isfinite(cast).all():
        overflowed = torch.isfinite(tensor) & ~torch.isfinite(cast)
        if overflowed.any():
            largest = tensor[overflowed].abs().max().item()
            raise CheckpointConversionError(
                f"{name} has values beyond the range of {target} (largest magnitude {largest:.4g}): they would be "
                "saved as infinities. Convert to bfloat16 or float32 instead."
            )
    return cast


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: a NaN in the checkpoint is written faithfully, yet NaN != NaN for `torch.equal`."""
    if a.shape != b.shape:
        return False
    return torch.equal(_bytes_of(a), _bytes_of(b))


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def verify_converted(
    output_dir: str | Path,
    state: dict[str, torch.Tensor | LazyTensor],
    dtype: torch.dtype,
    auto_class: type | None = None,
):
    """Reload the folder and compare every tensor, streaming shard by shard, with its (cast) source.

    The model is built through its Auto class (`AutoModel` unless told) on the meta device, so that a 4B folder is
    checked for missing, unexpected and mismatched keys without holding it in memory. Hub kernels (on by default
    since transformers 5.2x) are turned off: they refuse the meta device and have nothing to check here.
    """
    from transformers import AutoModel

    from .sharded_safetensors import read_weight_files

    output_dir = Path(output_dir)
    _, info = (auto_class or AutoModel).from_pretrained(
        output_dir, device_map="meta", output_loading_info=True, use_kernels=False
    )
    problems = [f"{name}: {sorted(info[name])}" for name in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if info.get(name)]
    if problems:
        raise CheckpointConversionError(f"The converted folder does not reload cleanly: {'; '.join(problems)}.")
    seen = set()
    for name, loaded in tqdm(read_weight_files(output_dir), total=len(state), desc="Verifying", disable=None):
        source = _cast(materialize(state[name]), dtype)
        if loaded.dtype != source.dtype or not _same_bits(loaded, source):
            raise CheckpointConversionError(f"Reloaded tensor {name} differs from the converted one.")
        seen.add(name)
    if seen != set(state):
        raise CheckpointConversionError(f"Tensors not written: {sorted(set(state) - seen)}.")
