"""Conversion of original (fairseq) ONE-PEACE checkpoints: safe reading, config derivation, the key map.

Nothing here executes pickled code: checkpoints are read with `torch.load(weights_only=True)` and only the numpy
scalar types the fairseq trainer stores are allow-listed.
"""

import ast
import math
import re
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .configuration_onepeace import OnePeaceConfig


SUPPORTED_KINDS = ("one_peace_pretrain", "one_peace_retrieval", "one_peace_classify")
# Head types of classification checkpoints this converter supports (one task model each).
SUPPORTED_CLASSIFY_HEAD_TYPES = ("image", "audio", "vl", "al")
# Classification checkpoints whose task gives the head another meaning: the original's RefCOCO task reads the four
# outputs as a sigmoid box, its AQA task ranks one score per candidate answer.
GROUNDING_TASKS = ("refcoco",)
MULTIPLE_CHOICE_TASKS = ("aqa",)

# numpy scalars in the trainer's metadata (optimizer_history, extra_state), under their numpy 1.x and 2.x names.
_NUMPY_SAFE_GLOBALS = [
    (np._core.multiarray.scalar, "numpy._core.multiarray.scalar"),
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    *[type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")],
]


class CheckpointConversionError(ValueError):
    """The checkpoint cannot be converted faithfully; the message says why."""


def load_original_checkpoint(path: str | Path) -> dict:
    """Read a fairseq checkpoint without executing pickled code (a malicious payload is refused)."""
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise _unsafe(path, error) from error
        # Old zip-less checkpoints cannot be memory-mapped.
        with torch.serialization.safe_globals(_NUMPY_SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise _unsafe(path, error) from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "cfg" not in checkpoint:
        raise CheckpointConversionError(f"{path} is not a fairseq ONE-PEACE checkpoint (no 'model' and 'cfg').")
    return checkpoint


def _unsafe(path, error) -> CheckpointConversionError:
    return CheckpointConversionError(
        f"Refusing to load {path}: it needs objects that a weights-only load does not allow ({error}). "
        "Only checkpoints made of tensors, plain containers and numpy scalars are read."
    )


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


def checkpoint_kind(checkpoint: dict) -> str:
    return checkpoint["cfg"]["model"]["_name"]


def _modalities(kind: str, encoder: dict, task: dict) -> list[str]:
    if kind == "one_peace_pretrain":
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
    _check_task(task, kind)
    keep_decoder = task == "pretraining"  # `task` is reused below for the checkpoint's task section
    if kind not in SUPPORTED_KINDS:
        raise CheckpointConversionError(f"Unknown checkpoint kind {kind!r}; supported: {SUPPORTED_KINDS}.")
    cfg = checkpoint["cfg"]
    model_cfg, task = cfg["model"], cfg["task"]
    encoder = model_cfg["encoder"]
    text, image, audio = encoder["text_adapter"], encoder["image_adapter"], encoder["audio_adapter"]
    state = checkpoint["model"]

    head_config = _classification_head_config(model_cfg, task) if kind == "one_peace_classify" else {}
    image_rel_bucket_size = image["rel_bucket_size"]
    if kind != "one_peace_pretrain":
        image_rel_bucket_size = task["patch_image_size"] // 16
    if image["vision_encoder_type"] not in ("hmlp", "mlp"):
        raise CheckpointConversionError(f"Encoder image stem {image['vision_encoder_type']!r} is not supported.")
    # Classification models always build one table per layer; retrieval models only with copy_rel_pos_table.
    per_layer = kind == "one_peace_classify" or (
        kind == "one_peace_retrieval" and bool(model_cfg.get("copy_rel_pos_table", False))
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
        audio_max_samples=16000 * int(task.get("max_duration", 15)),
        logit_scale_init_value=math.log(logit_scale_init),
        decoder_config=_decoder_config(model_cfg) if keep_decoder else None,
        **head_config,
    )


def _classification_head_config(model_cfg: dict, task: dict) -> dict:
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
    branches = _modalities("one_peace_classify", encoder, task)
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
    if task == "pretraining" and kind != "one_peace_pretrain":
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


def convert_state_dict(
    original: dict[str, torch.Tensor],
    config: OnePeaceConfig,
    expected_keys: set[str] | None = None,
    task: str = "encoder",
) -> dict[str, torch.Tensor]:
    """Map original keys to ours; refuse (listing the keys) anything unknown, missing or of the wrong shape.

    task: "encoder" drops the pretraining decoder and heads; "pretraining" keeps them (OnePeaceForPretraining keys).
    """
    if task not in TASKS:
        raise CheckpointConversionError(f"task must be one of {TASKS}, got {task!r}.")
    dropped_keys = DROPPED_KEYS if task == "encoder" else PRETRAINING_DROPPED_KEYS
    key_map = KEY_MAP if task == "encoder" else KEY_MAP + DECODER_KEY_MAP
    converted, unexpected = {}, []
    for key, tensor in tqdm(original.items(), desc="Mapping weights", disable=None):
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
            converted[new_key] = tensor
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {sorted(unexpected)}")
    if expected_keys is not None:
        missing = sorted(expected_keys - converted.keys())
        extra = sorted(converted.keys() - expected_keys)
        if missing:
            problems.append(f"missing keys: {missing}")
        if extra:
            problems.append(f"keys the model does not have (branch disabled in the config?): {extra}")
    if problems:
        raise CheckpointConversionError("Cannot convert the checkpoint faithfully; " + "; ".join(problems))
    _check_index_buffers(original, config)
    return converted


def _check_index_buffers(original: dict[str, torch.Tensor], config: OnePeaceConfig):
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
        if getattr(config, f"{modality}_use_rel_bias") and not torch.equal(stored, expected[modality]()):
            raise CheckpointConversionError(
                f"The stored {modality} relative-position index table differs from the one this model computes."
            )


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_processor(config: OnePeaceConfig):
    """The processor every original checkpoint was trained with: GPT-2 BPE, CLIP-normalized images, 16 kHz audio."""
    from .feature_extraction_onepeace import OnePeaceFeatureExtractor
    from .image_processing_onepeace import OnePeaceImageProcessor
    from .processing_onepeace import OnePeaceProcessor
    from .tokenization_onepeace import OnePeaceTokenizer

    return OnePeaceProcessor(
        tokenizer=OnePeaceTokenizer(),
        image_processor=OnePeaceImageProcessor(size={"height": config.image_size, "width": config.image_size}),
        feature_extractor=OnePeaceFeatureExtractor(sampling_rate=config.audio_sampling_rate),
    )


def target_model_classes(checkpoint: dict, config: OnePeaceConfig) -> tuple[type, type]:
    """The model class a checkpoint converts to and the class that must reload it (an Auto class where one fits)."""
    from transformers import (
        AutoModel,
        AutoModelForAudioClassification,
        AutoModelForImageClassification,
        AutoModelForVisualQuestionAnswering,
    )

    from .modeling_onepeace import OnePeaceModel
    from .modeling_onepeace_tasks import (
        OnePeaceForAudioClassification,
        OnePeaceForAudioLanguageClassification,
        OnePeaceForAudioLanguageMultipleChoice,
        OnePeaceForImageClassification,
        OnePeaceForVisionLanguageClassification,
        OnePeaceForVisualGrounding,
    )

    if checkpoint_kind(checkpoint) != "one_peace_classify":
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


def convert_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
    task: str = "encoder",
) -> OnePeaceConfig:
    """Convert an original checkpoint into a transformers folder, then reload it and check every tensor bit-exact."""
    from huggingface_hub import save_torch_state_dict

    if dtype not in DTYPES:
        raise CheckpointConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    torch_dtype = DTYPES[dtype]
    checkpoint = load_original_checkpoint(checkpoint_path)
    config = config_from_checkpoint(checkpoint, task)
    model_class, auto_class = target_model_classes(checkpoint, config)
    if task == "pretraining":
        from .modeling_onepeace_pretraining import OnePeaceForPretraining

        model_class = auto_class = OnePeaceForPretraining
    config.architectures = [model_class.__name__]
    config.dtype = torch_dtype
    with torch.device("meta"):
        expected_keys = set(model_class(config).state_dict().keys())
    state = convert_state_dict(checkpoint["model"], config, expected_keys, task)
    state = {key: tensor.to(torch_dtype) if tensor.is_floating_point() else tensor for key, tensor in state.items()}

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state, output_dir, max_shard_size=max_shard_size)
    config.save_pretrained(output_dir)
    default_processor(config).save_pretrained(output_dir)
    verify_converted(output_dir, state, auto_class)
    return config


def verify_converted(output_dir: str | Path, state: dict[str, torch.Tensor], auto_class: type | None = None):
    """Reload through the Auto classes (`AutoModel` unless told) and compare every tensor with what was written."""
    from transformers import AutoModel, AutoProcessor

    model = (auto_class or AutoModel).from_pretrained(output_dir)
    AutoProcessor.from_pretrained(output_dir)
    loaded = model.state_dict()
    if loaded.keys() != state.keys():
        raise CheckpointConversionError(
            f"Reloaded model keys differ: missing {sorted(state.keys() - loaded.keys())}, "
            f"extra {sorted(loaded.keys() - state.keys())}."
        )
    for key in tqdm(sorted(state), desc="Verifying", disable=None):
        if loaded[key].dtype != state[key].dtype or not torch.equal(loaded[key], state[key]):
            raise CheckpointConversionError(f"Reloaded tensor {key} differs from the converted one.")
