"""Model cards (README.md) of ONE-PEACE folders: one template per kind of model, rendered as a huggingface_hub
`ModelCard` and checked locally.

The templates are `model_cards/<kind>.md` of the repository, installed as `onepeace_hf.model_cards`, so that the
installed `onepeace-hf convert` writes the same cards as a source checkout. They are `string.Template` texts: a
value missing for a `$placeholder` is an error, never an empty field. The results the original authors report for
their released checkpoints (`model_cards/reported_results.yaml`) become the card's model-index, and a table in its
text, when a card is rendered for one of those files. `validate_model_card` checks what the Hub would refuse and
what the cards promise without the network (`ModelCard.validate` needs the Hub).
"""

import math
import re
import string
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from urllib.parse import unquote

import yaml
from huggingface_hub import ModelCard, ModelCardData, constants
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from huggingface_hub.repocard_data import model_index_to_eval_results


CARD_KINDS = (
    "pretrained",
    "vision",
    "retrieval",
    "image_classification",
    "audio_classification",
    "vqa",
    "nlvr2",
    "visual_grounding",
    "audio_question_answering",
    "tiny_default",
)
# Kinds made from the pretrained ONE-PEACE (fine-tuned from it, or cut out of it): their cards must name it.
DERIVED_KINDS = frozenset(CARD_KINDS) - {"pretrained", "tiny_default"}
# Where converted fine-tunes point as base_model unless told otherwise (render_converted_card(base_model=...)).
DEFAULT_BASE_MODEL = "OFA-Sys/ONE-PEACE"

# The Hub's pipeline tags: the keys of PIPELINE_DATA in huggingface.js (packages/tasks/src/pipelines.ts), which the
# Hub validates against. huggingface_hub ships no complete list (its inference clients cover a subset), so it is
# written out here.
HUB_PIPELINE_TAGS = frozenset({
    "any-to-any", "audio-classification", "audio-text-to-text", "audio-to-audio", "automatic-speech-recognition",
    "biology", "depth-estimation", "document-question-answering", "feature-extraction", "fill-mask", "graph-ml",
    "image-classification", "image-feature-extraction", "image-segmentation", "image-text-to-text", "image-to-3d",
    "image-to-image", "image-to-text", "image-to-video", "keypoint-detection", "mask-generation", "multiple-choice",
    "object-detection", "other", "question-answering", "reinforcement-learning", "robotics", "sentence-similarity",
    "summarization", "table-question-answering", "table-to-text", "tabular-classification", "tabular-regression",
    "tabular-to-text", "text-classification", "text-generation", "text-ranking", "text-retrieval", "text-to-3d",
    "text-to-audio", "text-to-image", "text-to-speech", "text-to-video", "text2text-generation",
    "time-series-forecasting", "token-classification", "translation", "unconditional-image-generation",
    "video-classification", "video-text-to-text", "visual-document-retrieval", "visual-question-answering",
    "voice-activity-detection", "zero-shot-classification", "zero-shot-image-classification",
    "zero-shot-object-detection",
})

_PLACEHOLDER = re.compile(r"\$(?:[A-Za-z_]\w*|\{[A-Za-z_]\w*\})")
# A Hub repository id: a name, or namespace/name, of letters, digits, '-', '_' and '.'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?$")
# Converted classification models: the card kind by class name (VL classifiers also need the config, see below).
_CLASSIFIER_KINDS = {
    "OnePeaceForImageClassification": "image_classification",
    "OnePeaceForAudioClassification": "audio_classification",
    "OnePeaceForVisualGrounding": "visual_grounding",
    "OnePeaceForAudioLanguageClassification": "audio_question_answering",
    "OnePeaceForAudioLanguageMultipleChoice": "audio_question_answering",
}
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _card_files():
    """The templates: the installed package data, or model_cards/ of a source checkout used without installing."""
    try:
        return resources.files("onepeace_hf.model_cards")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "model_cards"


def card_template(kind: str) -> str:
    """The raw template text of a card kind."""
    if kind not in CARD_KINDS:
        raise ValueError(f"Unknown model card kind {kind!r}; the kinds are: {', '.join(CARD_KINDS)}.")
    return (_card_files() / f"{kind}.md").read_text(encoding="utf-8")


def reported_results(kind: str, original_checkpoint: object) -> list[dict]:
    """The model-index results the original authors report for a released file (none for other files).

    Matched by file name; a URL-encoded download name (`finetune_refcoco%2B.pt`) counts as its decoded name.
    """
    if not original_checkpoint:
        return []
    name = unquote(Path(str(original_checkpoint)).name)
    table = yaml.safe_load((_card_files() / "reported_results.yaml").read_text(encoding="utf-8"))
    entry = table.get(name)
    if entry is None:
        return []
    if entry["kind"] != kind:
        raise ValueError(f"{name} is the original {entry['kind']} checkpoint; it cannot get a {kind} card.")
    return entry["results"]


def _results_text(results: list[dict]) -> str:
    if not results:
        return ("The original authors report no results for this checkpoint file. Evaluate the model on your task "
                "before relying on it.")
    rows = [f"| {r['task'].get('name') or r['task']['type']} | {r['dataset']['name']} | {r['dataset'].get('split', '')} "
            f"| {m.get('name') or m['type']} | {m['value']} |" for r in results for m in r["metrics"]]
    source = ("Reported by the ONE-PEACE authors for the original checkpoint ([README](https://github.com/OFA-Sys/"
              "ONE-PEACE#results)), measured with the original code; not re-measured by onepeace-hf:")
    return "\n".join([
        source,
        "",
        "| task | dataset | split | metric | reported |",
        "|---|---|---|---|---|",
        *rows,
    ])


def render_model_card(kind: str, values: Mapping[str, object]) -> ModelCard:
    """Fill the `kind` template with `values` and return the validated card.

    `$reported_results` is made from `values["original_checkpoint"]` and `$onepeace_hf_version` defaults to this
    package's version; every other placeholder needs a value, and the error names each one missing.
    """
    from . import __version__

    text = card_template(kind)
    results = reported_results(kind, values.get("original_checkpoint"))
    filled = {"onepeace_hf_version": __version__, **values, "reported_results": _results_text(results)}
    template = string.Template(text)
    needed = {match.group("named") or match.group("braced") for match in template.pattern.finditer(text)} - {None}
    missing = sorted(needed - filled.keys())
    if missing:
        raise ValueError(f"The {kind} model card needs a value for: {', '.join('$' + name for name in missing)}.")
    try:
        card = ModelCard(template.substitute(filled))
    except (yaml.YAMLError, ValueError) as error:
        raise ValueError(f"The {kind} model card's metadata does not parse after rendering: {error}") from error
    if results:
        name = str(values.get("repo_id") or kind)
        card.data.model_name, card.data.eval_results = model_index_to_eval_results([{"name": name, "results": results}])
    validate_model_card(card, kind)
    return card


def is_hub_model_id(name: str) -> bool:
    """Whether `name` reads as a Hub model id ("owner/name" or "name") and is not a local folder."""
    return bool(_REPO_ID.match(name)) and not Path(name).exists()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_model_card(card: ModelCard | str, kind: str | None = None) -> None:
    """Raise ValueError listing every problem the Hub would refuse or that breaks what these cards promise.

    Checked: the front matter parses into `ModelCardData`; license, library_name and pipeline_tag are set and the
    tag is one of the Hub's; the model-index parses with huggingface_hub's own parser and every metric value is a
    finite number; base_model is a Hub model id, and is present for `DERIVED_KINDS` when `kind` is given; no
    `$placeholder` is left.
    """
    text = card.content if isinstance(card, ModelCard) else card
    match = REGEX_YAML_BLOCK.search(text)
    if match is None:
        raise ValueError("Invalid model card: no YAML metadata block (--- ... ---) at the top.")
    try:
        metadata = yaml.safe_load(match.group(2))
    except yaml.YAMLError as error:
        raise ValueError(f"Invalid model card: the metadata is not YAML: {error}") from error
    if not isinstance(metadata, dict):
        raise ValueError("Invalid model card: the metadata is not a mapping.")

    problems = []
    try:  # model-index is parsed separately below, so that its problems are listed one by one
        ModelCardData(**{key: value for key, value in metadata.items() if key != "model-index"})
    except (TypeError, ValueError) as error:
        problems.append(f"the metadata does not load as ModelCardData: {error}")
    for key in ("license", "library_name", "pipeline_tag"):
        if not metadata.get(key):
            problems.append(f"{key} is missing")
    tag = metadata.get("pipeline_tag")
    if tag and tag not in HUB_PIPELINE_TAGS:
        problems.append(f"pipeline_tag {tag!r} is not a Hub pipeline tag")
    if "model-index" in metadata:
        try:
            _, results = model_index_to_eval_results(metadata["model-index"])
        except (KeyError, TypeError, ValueError) as error:
            problems.append(f"model-index does not parse ({type(error).__name__}: {error})")
        else:
            problems += [f"model-index value {r.metric_value!r} of {r.metric_name or r.metric_type} on "
                         f"{r.dataset_name} is not a number" for r in results if not _is_number(r.metric_value)]
    base_models = metadata.get("base_model") or []
    for model_id in [base_models] if isinstance(base_models, str) else base_models:
        if not (isinstance(model_id, str) and _REPO_ID.match(model_id)):
            problems.append(f"base_model {model_id!r} is not a Hub model id")
    if kind in DERIVED_KINDS and not base_models:
        problems.append(f"base_model is missing (a {kind} model is made from the pretrained ONE-PEACE)")
    left = sorted(set(_PLACEHOLDER.findall(text)))
    if left:
        problems.append(f"placeholders left unrendered: {', '.join(left)}")
    if problems:
        raise ValueError("Invalid model card:\n- " + "\n- ".join(problems))


def converted_card_kind(checkpoint_kind: str, model_class_name: str, config) -> str:
    """The card kind of a converted folder: from the original checkpoint's kind and the class it became."""
    from .original_checkpoint import CLASSIFY, PRETRAIN, RETRIEVAL, VISION

    if checkpoint_kind in (PRETRAIN, RETRIEVAL, VISION):
        return {PRETRAIN: "pretrained", RETRIEVAL: "retrieval", VISION: "vision"}[checkpoint_kind]
    if checkpoint_kind == CLASSIFY:
        if model_class_name == "OnePeaceForVisionLanguageClassification":
            return "nlvr2" if config.classifier_two_images else "vqa"
        if model_class_name in _CLASSIFIER_KINDS:
            return _CLASSIFIER_KINDS[model_class_name]
    raise ValueError(f"No model card kind for a {checkpoint_kind} checkpoint converted to {model_class_name}.")


def _verification_text(report) -> str:
    if report is None:
        return ("Its outputs were not compared with outputs recorded with the original code in this conversion "
                "(no expected-outputs file was given).")
    return (f"Its outputs were compared with `{Path(report.expected_file).name}`, recorded with the original code: "
            f"{len(report.checks)} outputs, all within atol + rtol x |expected| (atol {report.atol:g}, rtol "
            f"{report.rtol:g}); largest absolute difference {report.max_abs_error:.2g}.")


def render_converted_card(
    result,
    checkpoint_name: str,
    dtype: str,
    *,
    base_model: str = DEFAULT_BASE_MODEL,
    repo_id: str | None = None,
    revision: str | None = None,
) -> ModelCard:
    """The card of a folder `convert_checkpoint` wrote (`result` is its `ConversionResult`).

    base_model: the Hub id of the converted pretrained ONE-PEACE that derived models name (not used by the
        pretrained card). repo_id: the id the usage examples load (default: the folder's name). revision: the branch
        the folder is pushed to; the examples load it from there unless it is the default branch.
    """
    config = result.config
    kind = converted_card_kind(result.kind, result.model_class.__name__, config)
    values = {
        "repo_id": repo_id or Path(result.output_dir).resolve().name,  # "." is the current folder's name
        "original_checkpoint": Path(checkpoint_name).name,
        "dtype": _DTYPE_NAMES.get(dtype, dtype),
        "model_class": result.model_class.__name__,
        "verification": _verification_text(result.verification),
        "base_model": base_model,
        "modality_tags": ", ".join(config.modalities),
        "image_size": config.image_size,
        "num_labels": config.num_labels,
    }
    card = render_model_card(kind, values)
    if revision and revision != constants.DEFAULT_REVISION:
        # Every template quotes the id only as a from_pretrained / pipeline argument.
        quoted = '"' + values["repo_id"] + '"'
        card.text = card.text.replace(quoted, f'{quoted}, revision="{revision}"')
    note = _size_note(config)
    if note:  # right under the title, which names the released size
        card.text = re.sub(r"^(# .*\n)", lambda title: f"{title.group(1)}\n{note}\n", card.text, count=1, flags=re.M)
    return card


def _size_note(config) -> str:
    """For a folder smaller or larger than the released model (a test or custom checkpoint), since the templates
    describe the released one; empty at the released size."""
    from .configuration_onepeace import OnePeaceConfig

    released = OnePeaceConfig()
    if (config.hidden_size, config.num_hidden_layers) == (released.hidden_size, released.num_hidden_layers):
        return ""
    return (
        f"> **Not the released model's size.** This folder holds a ONE-PEACE with hidden size {config.hidden_size} "
        f"and {config.num_hidden_layers} fusion layers; the parameter counts, memory figures and results this card "
        f"quotes are those of the released model (hidden size {released.hidden_size}, "
        f"{released.num_hidden_layers} layers)."
    )


__all__ = [
    "CARD_KINDS",
    "DERIVED_KINDS",
    "HUB_PIPELINE_TAGS",
    "card_template",
    "converted_card_kind",
    "render_converted_card",
    "render_model_card",
    "reported_results",
    "validate_model_card",
]
