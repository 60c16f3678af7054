"""Which files of a model folder a conversion owns: what `--overwrite` may replace and a re-push may delete.

A converted folder is made of weights, a config, processor files, the package's modules (remote code), a card and a
checksum manifest. Everything else in the folder (evaluation results, the user's notes and scripts) is the user's:
no conversion or push removes it.
"""

import functools
import re
from pathlib import Path


# Weights, config and processor files of every conversion kind, the tokenizer files older transformers versions
# wrote besides, the card and the checksum manifest.
FIXED_NAMES = frozenset({
    "config.json", "model.safetensors", "model.safetensors.index.json", "processor_config.json",
    "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "README.md", "SHA256SUMS",
})
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


@functools.cache
def package_module_names() -> frozenset[str]:
    """The module files remote code copies into a folder: any of the package's flat modules."""
    return frozenset(path.name for path in Path(__file__).parent.glob("*.py") if path.name != "__init__.py")


def is_conversion_file(name: str) -> bool:
    """Whether a file name (relative to the folder) is one a conversion writes."""
    return name in FIXED_NAMES or bool(SHARD_NAME.fullmatch(name)) or name in package_module_names()


def conversion_files(folder: str | Path) -> list[str]:
    """The names of the files a conversion wrote into `folder` (possibly an earlier one)."""
    folder = Path(folder)
    return sorted(path.name for path in folder.iterdir() if path.is_file() and is_conversion_file(path.name))


def hub_delete_patterns() -> list[str]:
    """Files of a Hub repository that a re-push removes when the pushed folder lacks them, besides the weight files
    (`hub.WEIGHT_FILE_PATTERNS`): processor files of another kind, remote code of another class. The card is left
    alone (it may have been edited on the Hub)."""
    return sorted((FIXED_NAMES - {"README.md"}) | package_module_names())
