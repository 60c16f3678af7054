"""Making a saved folder loadable with `trust_remote_code=True` by users who did not install onepeace_hf.

The package's modules are flat with relative imports only, so the files a class needs can be copied next to the
weights as transformers' dynamic modules expect. Each config file then gets an `auto_map` naming, for every Auto
class the folder serves, the class to build. This is written here rather than through `register_for_auto_class`,
which keeps one Auto class per class (`OnePeaceModel` serves two) and changes the classes for the whole process.

The other way round, the package's classes drop an `auto_map` whose code is not in the folder they save to: one
loaded from a remote-code folder carries the map, and saved elsewhere without the code it would send
`trust_remote_code` users to missing files (and make pipelines ask whether to run custom code).
"""

import json
import shutil
import sys
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files


# The Auto classes each model class serves. Task models no Auto class fits (grounding, audio-language, the
# pretraining model) get `AutoModel`, so that remote-code users have one entry point for them too.
AUTO_CLASSES = {
    "OnePeaceModel": ("AutoModel", "AutoModelForZeroShotImageClassification"),
    "OnePeaceVisionModel": ("AutoModel",),
    "OnePeaceForImageClassification": ("AutoModelForImageClassification",),
    "OnePeaceForAudioClassification": ("AutoModelForAudioClassification",),
    "OnePeaceForVisionLanguageClassification": ("AutoModelForVisualQuestionAnswering",),
    "OnePeaceForVisualGrounding": ("AutoModel",),
    "OnePeaceForAudioLanguageClassification": ("AutoModel",),
    "OnePeaceForAudioLanguageMultipleChoice": ("AutoModel",),
    "OnePeaceForPretraining": ("AutoModel",),
}


def _reference(cls) -> str:
    """`module.Class` as auto_map writes it (the module file sits in the folder)."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def _copy_sources(folder: Path, classes) -> list[str]:
    copied = set()
    for cls in classes:
        source = sys.modules[cls.__module__].__file__
        for path in (source, *get_relative_import_files(source)):
            shutil.copyfile(path, folder / Path(path).name)
            copied.add(Path(path).name)
    return sorted(copied)


def _update_json(path: Path, update) -> None:
    if path.is_file():
        content = json.loads(path.read_text())
        update(content)
        path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


# The files of a saved folder that may hold an auto_map (the processor's also inside its parts' entries).
AUTO_MAP_FILES = ("config.json", "processor_config.json", "tokenizer_config.json", "preprocessor_config.json")


def _code_is_present(folder: Path, auto_map: dict) -> bool:
    references = [ref for value in auto_map.values() for ref in (value if isinstance(value, list) else [value])]
    # "repo--module.Class" points at another Hub repository's code, which is not expected here.
    local = [ref for ref in references if ref and "--" not in ref]
    return all((folder / f"{ref.rsplit('.', 1)[0]}.py").is_file() for ref in local)


def drop_dangling_auto_maps(folder: str | Path) -> None:
    """Remove every `auto_map` of the folder's config files whose code files are not in the folder."""
    folder = Path(folder)
    for name in AUTO_MAP_FILES:
        path = folder / name
        if not path.is_file():
            continue
        content = json.loads(path.read_text())
        holders = [content, *(value for value in content.values() if isinstance(value, dict))]
        dangling = [
            holder for holder in holders
            if isinstance(holder.get("auto_map"), dict) and not _code_is_present(folder, holder["auto_map"])
        ]
        for holder in dangling:
            del holder["auto_map"]
        if dangling:
            path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


class SavesWithoutDanglingAutoMap:
    """Mixin for the package's config and processor classes: `save_pretrained`, then `drop_dangling_auto_maps`."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        result = super().save_pretrained(save_directory, *args, **kwargs)
        drop_dangling_auto_maps(save_directory)
        return result


def add_remote_code(folder: str | Path, model_class: type) -> list[str]:
    """Copy the code a saved folder needs and write its `auto_map`s; returns the copied file names.

    Call it after the model's config and processor were saved into `folder`.
    """
    from .feature_extraction_onepeace import OnePeaceFeatureExtractor
    from .image_processing_onepeace import OnePeaceImageProcessor
    from .processing_onepeace import OnePeaceProcessor
    from .tokenization_onepeace import OnePeaceTokenizer

    if model_class.__name__ not in AUTO_CLASSES:
        raise ValueError(f"No remote-code mapping for {model_class.__name__}; known: {sorted(AUTO_CLASSES)}.")
    folder = Path(folder)
    processor_classes = (OnePeaceProcessor, OnePeaceTokenizer, OnePeaceImageProcessor, OnePeaceFeatureExtractor)
    copied = _copy_sources(folder, (model_class.config_class, model_class, *processor_classes))

    model_map = {"AutoConfig": _reference(model_class.config_class)}
    model_map.update({auto: _reference(model_class) for auto in AUTO_CLASSES[model_class.__name__]})
    _update_json(folder / "config.json", lambda config: config.update(auto_map=model_map))

    processor = {"AutoProcessor": _reference(OnePeaceProcessor)}
    image = {"AutoImageProcessor": _reference(OnePeaceImageProcessor)}
    audio = {"AutoFeatureExtractor": _reference(OnePeaceFeatureExtractor)}

    def processor_config(config):
        config["auto_map"] = processor
        for key, own in (("image_processor", image), ("feature_extractor", audio)):
            if isinstance(config.get(key), dict):
                config[key]["auto_map"] = {**own, **processor}

    _update_json(folder / "processor_config.json", processor_config)
    # A tokenizer entry is [slow class, fast class]: ours is a single class.
    tokenizer = {"AutoTokenizer": [_reference(OnePeaceTokenizer), None], **processor}
    _update_json(folder / "tokenizer_config.json", lambda config: config.update(auto_map=tokenizer))
    # An image processor saved on its own (the vision branch has no combined processor).
    _update_json(folder / "preprocessor_config.json", lambda config: config.update(auto_map=image))
    return copied
