"""One conversion entry point for every original kind: lazy safe reading, streaming shards, checksums, verification
against the original's recorded outputs, remote code."""

import copy
import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from onepeace_hf import OnePeaceModel
from onepeace_hf.conversion import CheckpointConversionError, convert_checkpoint
from onepeace_hf.original_checkpoint import load_original_checkpoint, read_original_checkpoint
from onepeace_hf.output_verification import OutputMismatchError
from onepeace_hf.remote_code import add_remote_code
from onepeace_hf.sharded_safetensors import ChecksumMismatchError, verify_checksum_manifest

from .conftest import CLASSIFY_CHECKPOINT, PRETRAIN_CHECKPOINT, REFERENCE, REPO_ROOT


EXPECTED_PRETRAIN = REFERENCE / "expected_tiny_pretrain.safetensors"
EXPECTED_CLASSIFY = REFERENCE / "expected_tiny_classify_image.safetensors"


def write_vision_pickle(path):
    """The vision branch as the original's convert_to_vision.py lays it out (a plain pickle of renamed tensors),
    made here from the reference pretraining checkpoint: image branch only, no final LayerNorm or projection."""
    state = torch.load(PRETRAIN_CHECKPOINT, weights_only=False)["model"]
    renamed = {}
    for key, tensor in state.items():
        if key.startswith(("image_proj.", "encoder_wrapper.fusion_model.image_layer_norm.")) or any(
            word in key for word in ("text", "audio", "decoder", "mask", "logit_scale", "version")
        ):
            continue
        key = key.replace("encoder_wrapper.image_adapter.", "image_adapter.")
        renamed[key.replace("encoder_wrapper.fusion_model.", "encoder.")] = tensor
    with open(path, "wb") as file:
        pickle.dump({"model": renamed, "__author__": "ofa", "matching_heuristics": True}, file)
    return state


@pytest.mark.parametrize("path", [PRETRAIN_CHECKPOINT, CLASSIFY_CHECKPOINT], ids=["pretrain", "classify"])
def test_lazy_reader_equals_torch_load(path):
    reference = torch.load(path, weights_only=False)
    lazy = read_original_checkpoint(path)
    assert lazy["cfg"] == reference["cfg"] and lazy["model"].keys() == reference["model"].keys()
    for key, tensor in reference["model"].items():
        loaded = lazy["model"][key].load()
        assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor), key


def test_pre_zip_torch_files_and_plain_pickles_are_read(tmp_path):
    reference = torch.load(CLASSIFY_CHECKPOINT, weights_only=False)
    torch.save(reference, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = load_original_checkpoint(tmp_path / "legacy.pt")
    assert all(torch.equal(legacy["model"][k], v) for k, v in reference["model"].items())
    state = write_vision_pickle(tmp_path / "vision.pkl")
    vision = load_original_checkpoint(tmp_path / "vision.pkl", kind="vision")
    assert "cfg" not in vision
    assert torch.equal(vision["model"]["image_adapter.pos_embed"], state["encoder_wrapper.image_adapter.pos_embed"])


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_plain_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pkl", "wb") as file:
        pickle.dump({"model": {"image_adapter.x": torch.zeros(1)}, "x": _Payload(marker)}, file)
    with pytest.raises(CheckpointConversionError, match="Refusing to load"):
        read_original_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_kind_is_detected_and_can_be_required(tmp_path):
    with pytest.raises(CheckpointConversionError, match="one_peace_classify was asked for.*one_peace_pretrain"):
        read_original_checkpoint(PRETRAIN_CHECKPOINT, kind="one_peace_classify")
    torch.save({"model": {"weird.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointConversionError, match="not an original ONE-PEACE checkpoint"):
        read_original_checkpoint(tmp_path / "other.pt")


def test_vision_branch_converts_to_a_backbone_matching_the_original(tmp_path, expected):
    from transformers import AutoModel
    from transformers.models.auto.image_processing_auto import AutoImageProcessor  # the real class on 5.17 too

    state = write_vision_pickle(tmp_path / "one-peace-vision.pkl")
    result = convert_checkpoint(tmp_path / "one-peace-vision.pkl", tmp_path / "vision", max_shard_size="200KB")
    assert result.kind == "vision" and result.model_class.__name__ == "OnePeaceVisionModel"
    assert result.config.num_attention_heads == 4 and result.config.num_hidden_layers == 2
    model = AutoModel.from_pretrained(tmp_path / "vision").eval()
    assert type(model).__name__ == "OnePeaceVisionModel"
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "vision")).__name__ == "OnePeaceImageProcessor"
    with torch.no_grad():
        hidden = model(pixel_values=expected["inputs.src_images"]).last_hidden_state
    # The backbone stops before the final LayerNorm: with the pretraining checkpoint's one it gives image.hidden.
    prefix = "encoder_wrapper.fusion_model.image_layer_norm."
    normed = F.layer_norm(hidden, hidden.shape[-1:], state[prefix + "weight"], state[prefix + "bias"])
    torch.testing.assert_close(normed, expected["image.hidden"], atol=1e-5, rtol=0)


def test_vision_checkpoint_with_a_missing_tensor_is_refused(tmp_path):
    write_vision_pickle(tmp_path / "vision.pkl")
    with open(tmp_path / "vision.pkl", "rb") as file:
        content = pickle.load(file)
    del content["model"]["encoder.layers.1.self_attn.q_proj.weight"]
    with open(tmp_path / "broken.pkl", "wb") as file:
        pickle.dump(content, file)
    with pytest.raises(CheckpointConversionError, match=r"missing keys: \['encoder.layers.1.self_attn.q_proj.weight'"):
        convert_checkpoint(tmp_path / "broken.pkl", tmp_path / "out")


def test_pretraining_with_decoder_converts_and_reloads(tmp_path):
    from onepeace_hf import OnePeaceForPretraining

    result = convert_checkpoint(PRETRAIN_CHECKPOINT, tmp_path / "pretraining", task="pretraining")
    assert result.model_class is OnePeaceForPretraining
    model = OnePeaceForPretraining.from_pretrained(tmp_path / "pretraining")
    original = torch.load(PRETRAIN_CHECKPOINT, weights_only=False)["model"]
    assert torch.equal(model.mask_heads["image"].weight, original["image_mask_head.weight"])


def test_verification_passes_on_the_reference_outputs(tmp_path):
    result = convert_checkpoint(PRETRAIN_CHECKPOINT, tmp_path / "encoder", expected_outputs=EXPECTED_PRETRAIN)
    compared = {check.name for check in result.verification.checks}
    assert {"text.embedding", "image.hidden", "audio.embedding", "vl.text_hidden", "al.audio_hidden"} <= compared
    assert result.verification.max_abs_error < 1e-4


def test_verification_fails_loudly_on_a_wrong_output(tmp_path):
    tampered = load_file(EXPECTED_PRETRAIN)
    tampered["image.embedding"] = tampered["image.embedding"] + 1e-3
    save_file(tampered, tmp_path / "expected.safetensors")
    with pytest.raises(OutputMismatchError, match=r"image\.embedding: max abs error 0\.001 \(FAILED\)"):
        convert_checkpoint(PRETRAIN_CHECKPOINT, tmp_path / "out", expected_outputs=tmp_path / "expected.safetensors")
    assert not (tmp_path / "out").exists()  # nothing unverified is left to load by mistake, nor an empty folder
    (tmp_path / "mine").mkdir()  # a folder the user made stays
    with pytest.raises(OutputMismatchError):
        convert_checkpoint(PRETRAIN_CHECKPOINT, tmp_path / "mine", expected_outputs=tmp_path / "expected.safetensors")
    assert list((tmp_path / "mine").iterdir()) == []


def test_classification_verification_needs_the_pinned_inputs(tmp_path):
    with pytest.raises(OutputMismatchError, match="records no inputs.*--expected-inputs"):
        convert_checkpoint(CLASSIFY_CHECKPOINT, tmp_path / "a", expected_outputs=EXPECTED_CLASSIFY)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    other = load_file(EXPECTED_PRETRAIN)
    other["inputs.src_images"] = other["inputs.src_images"].flip(0)
    save_file(other, tmp_path / "inputs.safetensors")
    with pytest.raises(OutputMismatchError, match="not the ones"):
        convert_checkpoint(CLASSIFY_CHECKPOINT, tmp_path / "b", expected_outputs=EXPECTED_CLASSIFY,
                           expected_inputs=tmp_path / "inputs.safetensors")


def classify_fixtures():
    """Every classification fixture of the reference set (CI may hold more than the visible image one)."""
    found = []
    for checkpoint in sorted(REFERENCE.glob("one_peace_tiny_classify_*.pt")):
        name = re.sub(r"^one_peace_tiny_classify_", "", checkpoint.stem)
        outputs = REFERENCE / f"expected_tiny_classify_{name}.safetensors"
        if outputs.exists():
            found.append(pytest.param(checkpoint, outputs, id=name))
    return found


@pytest.mark.parametrize("checkpoint, outputs", classify_fixtures())
def test_classify_fixtures_pass_verification(tmp_path, checkpoint, outputs):
    result = convert_checkpoint(checkpoint, tmp_path / "converted", expected_outputs=outputs,
                                expected_inputs=EXPECTED_PRETRAIN)
    assert "logits" in {check.name for check in result.verification.checks}


def test_shards_dtype_and_checksum_manifest(tmp_path):
    folder = tmp_path / "bf16"
    convert_checkpoint(PRETRAIN_CHECKPOINT, folder, dtype="bf16", max_shard_size="2MB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (folder / "model.safetensors.index.json").exists()
    with safe_open(shards[0], "pt") as shard:
        assert all(shard.get_tensor(name).dtype == torch.bfloat16 for name in shard.keys())
    verify_checksum_manifest(folder)
    with open(shards[1], "r+b") as file:  # flip one byte of the data
        file.seek(-1, os.SEEK_END)
        last = file.read(1)
        file.seek(-1, os.SEEK_END)
        file.write(bytes([last[0] ^ 1]))
    (folder / "notes.txt").write_text("added later")
    (folder / "config.json").unlink()
    with pytest.raises(ChecksumMismatchError) as error:
        verify_checksum_manifest(folder)
    message = str(error.value)
    assert f"checksum differs: {shards[1].name}" in message
    assert "missing: config.json" in message and "not in the manifest: notes.txt" in message


def test_a_previous_conversion_is_only_replaced_on_request(tmp_path):
    convert_checkpoint(CLASSIFY_CHECKPOINT, tmp_path / "out", model_card=False)
    with pytest.raises(CheckpointConversionError, match="not empty"):
        convert_checkpoint(CLASSIFY_CHECKPOINT, tmp_path / "out")
    (tmp_path / "out" / "keep.txt").write_text("mine")
    convert_checkpoint(CLASSIFY_CHECKPOINT, tmp_path / "out", max_shard_size="300KB", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "out" / "model.safetensors").exists()  # the old single file is not left behind
    verify_checksum_manifest(tmp_path / "out")


REMOTE_CODE_CHECK = """
import sys
sys.modules["onepeace_hf"] = None  # the package is not importable here
sys.modules["soxr"] = None  # nor soxr: needed only to resample audio
import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, AutoModel, AutoProcessor
folder, expected, classify = sys.argv[1:4]
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(processor).__name__ == "OnePeaceProcessor", type(processor)
assert processor(audio=[np.ones(16000)], sampling_rate=16000)["input_values"].shape == (1, 16000)
try:
    processor(audio=[np.ones(8000)], sampling_rate=8000)
except ImportError as error:
    assert "pip install soxr" in str(error), error
else:
    raise AssertionError("resampled without soxr")
with torch.no_grad():
    logits = model(pixel_values=load_file(expected)["inputs.src_images"]).logits
print("max error", (logits - load_file(classify)["logits"]).abs().max().item())
# Saved by a remote-code user: transformers copies the code, and the folder keeps its auto_map.
model.save_pretrained("resaved")
processor.save_pretrained("resaved")
assert type(AutoModelForImageClassification.from_pretrained("resaved", trust_remote_code=True)).__name__ == (
    "OnePeaceForImageClassification"
)
assert type(AutoProcessor.from_pretrained("resaved", trust_remote_code=True)).__name__ == "OnePeaceProcessor"
"""


@pytest.mark.slow
def test_converted_folder_loads_with_remote_code_without_the_package(tmp_path):
    convert_checkpoint(CLASSIFY_CHECKPOINT, tmp_path / "classify")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_CHECK, str(tmp_path / "classify"), str(EXPECTED_PRETRAIN),
         str(EXPECTED_CLASSIFY)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("max error")[1]) < 1e-5


def test_saving_a_remote_code_folders_model_elsewhere_drops_its_auto_map(tmp_path):
    """The package's classes copy no code: an auto_map carried over from the converted folder would point
    trust_remote_code users at missing files (and make pipelines ask whether to run custom code)."""
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor

    from onepeace_hf import OnePeaceForAudioClassification

    convert_checkpoint(PRETRAIN_CHECKPOINT, tmp_path / "converted", model_card=False)
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["auto_map"]
    saved, task = tmp_path / "saved", tmp_path / "task"
    AutoModel.from_pretrained(tmp_path / "converted").save_pretrained(saved)
    AutoProcessor.from_pretrained(tmp_path / "converted").save_pretrained(saved)
    AutoImageProcessor.from_pretrained(tmp_path / "converted").save_pretrained(saved)
    OnePeaceForAudioClassification.from_pretrained(tmp_path / "converted", num_labels=3).save_pretrained(task)
    written = [*saved.glob("*.json"), *task.glob("*.json")]
    assert {path.name for path in written} >= {"config.json", "processor_config.json", "tokenizer_config.json"}
    assert not [path for path in written if "auto_map" in path.read_text()]

    add_remote_code(saved, OnePeaceModel)  # what makes a folder remote-code ready, kept on later saves
    AutoModel.from_pretrained(saved).save_pretrained(saved)
    AutoProcessor.from_pretrained(saved).save_pretrained(saved)
    for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
        assert "auto_map" in (saved / name).read_text(), name


def test_cli_kind_mismatch_and_unknown_kind_fail_with_a_message(tmp_path, original_checkpoint):
    script = REPO_ROOT / "conversion" / "convert_original_checkpoint.py"
    run = subprocess.run(
        [sys.executable, str(script), "--checkpoint", str(CLASSIFY_CHECKPOINT), "--output-dir", str(tmp_path / "o"),
         "--kind", "vision"], capture_output=True, text=True,
    )
    assert run.returncode == 1 and "vision was asked for" in run.stderr and "Traceback" not in run.stderr
    unknown = {"cfg": copy.deepcopy(original_checkpoint["cfg"]), "model": {}}
    unknown["cfg"]["model"]["_name"] = "one_peace_caption"
    torch.save(unknown, tmp_path / "caption.pt")
    run = subprocess.run([sys.executable, str(script), "--checkpoint", str(tmp_path / "caption.pt"), "--output-dir",
                          str(tmp_path / "p")], capture_output=True, text=True)
    assert run.returncode == 1 and "Unknown checkpoint kind 'one_peace_caption'" in run.stderr


def test_the_encoder_of_a_classifier_folder_warns_that_its_projections_are_random(tmp_path):
    """AutoModel (and the feature-extraction pipelines) build OnePeaceModel from a classifier folder too."""
    from transformers import AutoModel
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    convert_checkpoint(CLASSIFY_CHECKPOINT, tmp_path / "classify", model_card=False)
    convert_checkpoint(PRETRAIN_CHECKPOINT, tmp_path / "encoder", model_card=False)
    logger = transformers_logging.get_logger("onepeace_hf.modeling_onepeace")
    with CaptureLogger(logger) as encoder_log:
        AutoModel.from_pretrained(tmp_path / "encoder")
    assert "randomly initialized projections" not in encoder_log.out
    with CaptureLogger(logger) as classifier_log:
        AutoModel.from_pretrained(tmp_path / "classify")
    assert "saved by OnePeaceForImageClassification" in classifier_log.out
    assert "randomly initialized projections" in classifier_log.out
