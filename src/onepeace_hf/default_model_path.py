"""Where the package's tiny default model lives: a standard model folder shipped as package data.

It is trained on the spoken/printed digits set (data/digits) by data/train_default_model.sh; see its README.md.
"""

from pathlib import Path


DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "default_model"
