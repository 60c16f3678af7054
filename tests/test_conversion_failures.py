"""What a conversion does when things go wrong: damaged inputs, values a dtype cannot hold, a failed or interrupted
run, and a folder shared with the user's own files."""

import json
import signal
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from onepeace_hf.conversion import CheckpointConversionError, convert_checkpoint
from onepeace_hf.output_verification import OutputMismatchError
from onepeace_hf.sharded_safetensors import verify_checksum_manifest

from .conftest import CLASSIFY_CHECKPOINT, PRETRAIN_CHECKPOINT, REFERENCE, REPO_ROOT


EXPECTED_PRETRAIN = REFERENCE / "expected_tiny_pretrain.safetensors"
WEIGHT = "encoder_wrapper.fusion_model.layers.0.self_attn.q_proj.weight"


def hidden_entries(folder):
    return [path.name for path in folder.iterdir() if path.name.startswith(".")]


def folder_state(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_overwrite_replaces_the_previous_conversion_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(CLASSIFY_CHECKPOINT, out)  # one file, and the task model's code
    assert (out / "modeling_onepeace_tasks.py").exists() and (out / "model.safetensors").exists()
    mine = {"eval_results.json": '{"top1": 0.5}', "train.py": "print('mine')\n", "notes.txt": "mine"}
    for name, text in mine.items():
        (out / name).write_text(text)
    (out / "runs").mkdir()
    (out / "runs" / "log.txt").write_text("mine")

    convert_checkpoint(PRETRAIN_CHECKPOINT, out, max_shard_size="2MB", overwrite=True)
    assert all((out / name).read_text() == text for name, text in mine.items())
    assert (out / "runs" / "log.txt").read_text() == "mine"
    # The previous conversion's files the new one does not write are gone: its single weight file (which
    # from_pretrained would prefer to the new shards) and the task model's code.
    assert not (out / "model.safetensors").exists() and not (out / "modeling_onepeace_tasks.py").exists()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["OnePeaceModel"]
    verify_checksum_manifest(out)
    assert hidden_entries(out) == []  # no staging folder left


def test_a_failed_conversion_leaves_the_previous_one_as_it_was(tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(PRETRAIN_CHECKPOINT, out)
    before = folder_state(out)
    wrong = load_file(EXPECTED_PRETRAIN)
    wrong["image.embedding"] = wrong["image.embedding"] + 1
    from safetensors.torch import save_file

    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(OutputMismatchError):
        convert_checkpoint(PRETRAIN_CHECKPOINT, out, max_shard_size="2MB", expected_outputs=tmp_path /
                           "wrong.safetensors", overwrite=True)
    assert folder_state(out) == before
    verify_checksum_manifest(out)
    assert hidden_entries(out) == []


def test_a_staging_folder_left_by_a_killed_conversion_is_not_content(tmp_path):
    (tmp_path / "out" / ".onepeace-converting-x1y2").mkdir(parents=True)
    convert_checkpoint(PRETRAIN_CHECKPOINT, tmp_path / "out")  # no overwrite needed
    verify_checksum_manifest(tmp_path / "out")


# Runs the conversion CLI, with SIGTERM arriving while the converted folder is being checked.
TERMINATED_DURING_CONVERSION = """
import os, signal, sys
import onepeace_hf.conversion as conversion
from onepeace_hf.cli import main

def terminated(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("SIGTERM did not stop the conversion")

conversion.verify_converted = terminated
sys.exit(main(["convert", "--checkpoint", sys.argv[1], "--output-dir", sys.argv[2], "-q"]))
"""


def test_a_terminated_conversion_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", TERMINATED_DURING_CONVERSION, str(PRETRAIN_CHECKPOINT), str(out)],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert not out.exists()


def zip_with_a_damaged_member(path):
    data = bytearray(PRETRAIN_CHECKPOINT.read_bytes())
    with zipfile.ZipFile(PRETRAIN_CHECKPOINT) as archive:
        member = next(info for info in archive.infolist() if info.filename.endswith(f"/data/{_storage_of(WEIGHT)}"))
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    data[member.header_offset + 30 + name_length + extra_length + 5] ^= 0xFF  # stored (not compressed) bytes
    path.write_bytes(bytes(data))


def _storage_of(key):
    """The storage number a tensor of the reference checkpoint is saved under (what the damage must hit)."""
    from onepeace_hf.original_checkpoint import read_original_checkpoint

    return read_original_checkpoint(PRETRAIN_CHECKPOINT)["model"][key]._storage.member.rsplit("/", 1)[-1]


def damaged(kind, path):
    if kind == "truncated archive":
        path.write_bytes(PRETRAIN_CHECKPOINT.read_bytes()[:100_000])
    elif kind == "damaged tensor data":
        zip_with_a_damaged_member(path)
    else:  # a truncated plain pickle, as the vision branch is stored
        import pickle

        data = pickle.dumps({"model": {"image_adapter.pos_embed": torch.ones(5, 4)}})
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["truncated archive", "damaged tensor data", "truncated pickle"])
def test_damaged_checkpoints_are_named_as_such(tmp_path, kind):
    path = tmp_path / "one-peace.pt"
    damaged(kind, path)
    with pytest.raises(CheckpointConversionError, match="one-peace.pt is damaged or incomplete"):
        convert_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def checkpoint_with(tmp_path, key, value):
    checkpoint = torch.load(PRETRAIN_CHECKPOINT, weights_only=False)
    checkpoint["model"][key] = checkpoint["model"][key].clone()
    checkpoint["model"][key][0, :3] = value
    torch.save(checkpoint, tmp_path / "changed.pt")
    return tmp_path / "changed.pt"


def test_nan_weights_are_converted_faithfully(tmp_path):
    convert_checkpoint(checkpoint_with(tmp_path, WEIGHT, float("nan")), tmp_path / "out")
    written = load_file(tmp_path / "out" / "model.safetensors")["encoder.layers.0.self_attn.q_proj.weight"]
    assert written[0, :3].isnan().all() and written[1:].isfinite().all()


def test_float16_refuses_weights_beyond_its_range(tmp_path):
    path = checkpoint_with(tmp_path, WEIGHT, 1e6)
    with pytest.raises(CheckpointConversionError, match=r"q_proj.weight has values beyond the range of torch.float16 "
                                                        r"\(largest magnitude 1e\+06\).*bfloat16 or float32"):
        convert_checkpoint(path, tmp_path / "out", dtype="fp16")
    assert not (tmp_path / "out").exists()
    convert_checkpoint(path, tmp_path / "bf16", dtype="bf16")  # bfloat16 holds them


def test_a_cfg_without_a_field_the_conversion_reads_is_named(tmp_path):
    checkpoint = torch.load(PRETRAIN_CHECKPOINT, weights_only=False)
    del checkpoint["cfg"]["model"]["encoder"]["attention_heads"]
    torch.save(checkpoint, tmp_path / "odd.pt")
    with pytest.raises(CheckpointConversionError, match="cfg lacks the field 'attention_heads'"):
        convert_checkpoint(tmp_path / "odd.pt", tmp_path / "out")


def test_the_card_of_a_conversion_into_the_current_folder_names_that_folder(tmp_path, monkeypatch):
    folder = tmp_path / "onepeace-tiny"
    folder.mkdir()
    monkeypatch.chdir(folder)
    convert_checkpoint(PRETRAIN_CHECKPOINT, ".")
    assert 'from_pretrained("onepeace-tiny")' in (folder / "README.md").read_text()
