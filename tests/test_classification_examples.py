"""The classification recipe (collation, criterion, `evaluate` accuracy) and its two scripts on synthetic data:
full fine-tuning with layer-wise LR decay from a `save_to_disk` folder, and LoRA on two processes. 8 tone classes,
chance accuracy 12.5%."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForAudioClassification, AutoProcessor

import onepeace_hf  # noqa: F401
from onepeace_hf import (
    OnePeaceFeatureExtractor,
    OnePeaceForAudioClassification,
    OnePeaceImageProcessor,
    OnePeaceProcessor,
    load_lora_classifier,
    lora_classifier_kwargs,
)
from onepeace_hf.training.classification import (
    ClassificationCollator,
    ClassificationDataArguments,
    accuracy_evaluator,
    classification_criterion,
    label_names,
    load_accuracy_metric,
    load_classification_split,
)
from onepeace_hf.training.data import PairCollator
from onepeace_hf.training.synthetic import synthetic_pairs
from tests.launching import accelerate_launch

from .conftest import tiny_random_config


REPO = Path(__file__).resolve().parents[1]


def read_json_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------------
# Recipe parts
# ----------------------------------------------------------------------------------------------------------------------


def test_accuracy_metric_loads_offline_and_counts_matches():
    metric = load_accuracy_metric()
    metric.add_batch(predictions=[0, 1, 2, 3], references=[0, 1, 0, 0])
    metric.add_batch(predictions=torch.tensor([5]), references=torch.tensor([5]))
    assert metric.compute() == {"accuracy": 3 / 5}


def test_collator_criterion_and_evaluator():
    processor = OnePeaceProcessor(image_processor=OnePeaceImageProcessor(size={"height": 32, "width": 32}))
    images = synthetic_pairs(4, "image")
    batch = ClassificationCollator(processor, "image", "image")(list(images))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["labels"].tolist() == [0, 1, 2, 3]
    audio = synthetic_pairs(3, "audio")
    batch = ClassificationCollator(processor, "audio", "audio")(list(audio))
    assert batch["input_values"].shape == batch["padding_mask"].shape == (3, 16000)
    with pytest.raises(ValueError, match="modality must be one of"):
        ClassificationCollator(processor, "video")
    # Clips at other rates (audio files) are prepared one by one, each at its own rate, and padded together.
    mixed = [dict(row) for row in audio]
    tone = np.sin(np.arange(8000) * 0.3).astype(np.float32)
    mixed[1]["audio"] = {"array": tone, "sampling_rate": 8000}
    collators = ClassificationCollator(processor, "audio", "audio"), PairCollator(processor, audio_column="audio")
    for collated in (collate(mixed) for collate in collators):
        alone = processor(audio=[tone], sampling_rate=8000, return_tensors="pt")["input_values"][0]
        torch.testing.assert_close(collated["input_values"][1], alone)
        torch.testing.assert_close(collated["input_values"][[0, 2]], batch["input_values"][[0, 2]])

    torch.manual_seed(0)
    model = OnePeaceForAudioClassification(tiny_random_config(num_labels=8)).eval()
    batch = ClassificationCollator(processor, "audio", "audio")(list(audio))
    output = classification_criterion(model, **batch)
    logits = model(input_values=batch["input_values"], padding_mask=batch["padding_mask"]).logits
    torch.testing.assert_close(output["loss"], torch.nn.functional.cross_entropy(logits, batch["labels"]))
    assert output["accuracy"].item() == (logits.argmax(-1) == batch["labels"]).float().mean().item()
    evaluated = accuracy_evaluator(ClassificationCollator(processor, "audio", "audio"), audio, batch_size=2)(model)
    assert evaluated["accuracy"] == pytest.approx(output["accuracy"].item())


def test_data_arguments_and_labels():
    with pytest.raises(ValueError, match="exactly one of --dataset, --synthetic N and --digits_root"):
        ClassificationDataArguments()
    with pytest.raises(ValueError, match="modality must be one of"):
        ClassificationDataArguments(modality="video", synthetic=8)
    data = ClassificationDataArguments(modality="audio", synthetic=16, synthetic_eval=8)
    assert (data.input_column, data.eval_split) == ("audio", "validation")
    train, evaluation = load_classification_split(data, "train"), load_classification_split(data, "validation")
    assert (len(train), len(evaluation)) == (16, 8)
    assert label_names(train) == ["red", "green", "blue", "yellow", "purple", "cyan", "orange", "gray"]
    plain = datasets.Dataset.from_dict({"label": [0, 2, 1]})
    assert label_names(plain) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="class_encode_column"):
        label_names(datasets.Dataset.from_dict({"label": ["cat", "dog"]}))


def test_the_digits_set_and_text_labels_load_for_classification(tmp_path):
    digits = ClassificationDataArguments(modality="audio", digits_root=str(REPO / "data" / "digits"))
    test_split = load_classification_split(digits, "test")
    assert "audio" in test_split.column_names
    assert label_names(test_split)[:3] == ["zero", "one", "two"]
    with pytest.raises(ValueError, match="'test' split's classes .* are not the training split's"):
        load_classification_split(digits, "test", class_names=["zero", "one"])
    with pytest.raises(ValueError, match="single class; a classifier needs at least two"):
        label_names(datasets.Dataset.from_dict({"label": [0, 0]}))

    # CSV files: text labels are numbered by the training split's sorted names, in every split alike.
    (tmp_path / "train.csv").write_text("path,kind\na.png,dog\nb.png,cat\nc.png,dog\n")
    (tmp_path / "validation.csv").write_text("path,kind\nd.png,dog\n")
    data = ClassificationDataArguments(dataset=str(tmp_path), input_column="path", label_column="kind")
    train = load_classification_split(data, "train")
    assert label_names(train, "kind") == ["cat", "dog"] and list(train["kind"]) == [1, 0, 1]
    validation = load_classification_split(data, "validation", class_names=["dog", "cat"])
    assert list(validation["kind"]) == [0]
    with pytest.raises(ValueError, match="labels that the training split lacks: \\['dog'\\]"):
        load_classification_split(data, "validation", class_names=["cat"])
    numbered = tmp_path / "numbered"  # class indices beyond the training split's
    numbered.mkdir()
    (numbered / "train.csv").write_text("path,kind\na.png,0\nb.png,1\n")
    (numbered / "test.csv").write_text("path,kind\ne.png,2\n")
    data = ClassificationDataArguments(dataset=str(numbered), input_column="path", label_column="kind")
    names = label_names(load_classification_split(data, "train"), "kind")
    with pytest.raises(ValueError, match="'test' split has label 2; the training split has 2 classes"):
        load_classification_split(data, "test", class_names=names)

    # -1 is how `datasets` marks an unlabelled row: counted as a wrong answer, or an index error mid-training.
    (numbered / "validation.csv").write_text("path,kind\ne.png,1\nf.png,-1\ng.png,-1\n")
    with pytest.raises(ValueError, match="'validation' split has 2 rows without a label .*dataset.filter"):
        load_classification_split(data, "validation", class_names=names)
    from onepeace_hf.training.classification import check_labels_are_classes

    with pytest.raises(ValueError, match="'test' split has no rows"):
        check_labels_are_classes(datasets.Dataset.from_dict({"kind": [1]}).select([]), "kind", "test")
    # No evaluation asked for with a synthetic set: no validation split is made up.
    assert ClassificationDataArguments(modality="image", synthetic=8, synthetic_eval=0).eval_split is None


# ----------------------------------------------------------------------------------------------------------------------
# The scripts
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_finetuning_script_with_layer_decay_from_a_saved_dataset(tiny_random_model_dir, tmp_path):
    splits = {"train": synthetic_pairs(128, "audio", seed=0), "validation": synthetic_pairs(64, "audio", seed=1)}
    renamed = {k: v.rename_column("audio", "clip") for k, v in splits.items()}
    datasets.DatasetDict(renamed).save_to_disk(tmp_path / "data")
    command = [
        sys.executable, str(REPO / "examples" / "finetune_classification.py"), "--model", str(tiny_random_model_dir),
        "--modality", "audio", "--dataset", str(tmp_path / "data"), "--input_column", "clip", "--eval_split",
        "validation", "--output_dir", str(tmp_path / "run"), "--max_steps", "24", "--per_device_batch_size", "16",
        "--learning_rate", "1e-3", "--weight_decay", "0", "--layer_decay", "0.75", "--logging_steps", "8",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]

    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    print(results)
    assert results["accuracy_after"] >= results["accuracy_before"] + 0.3, results
    assert read_json_lines(tmp_path / "run" / "training_log.jsonl")[-1] == {
        "step": 24, "eval/accuracy": results["accuracy_after"]
    }
    final = tmp_path / "run" / "final"
    model = AutoModelForAudioClassification.from_pretrained(final)
    assert type(model) is OnePeaceForAudioClassification and model.config.id2label[2] == "blue"
    AutoProcessor.from_pretrained(final)
    # Full fine-tuning: the adapter at the bottom moved too (at 0.75**3 of the head's learning rate).
    trained, initial = load_file(final / "model.safetensors"), load_file(tiny_random_model_dir / "model.safetensors")
    name = "adapters.audio.feature_encoder.projection.weight"
    assert not torch.equal(trained[name], initial[name])


@pytest.mark.slow
def test_lora_script_on_two_processes_saves_an_adapter_that_reloads(tiny_random_model_dir, tmp_path):
    output_dir = tmp_path / "run"
    relative_model_dir = os.path.relpath(tiny_random_model_dir, REPO)  # the scripts run in REPO
    result = accelerate_launch(
        REPO / "examples" / "lora_classification.py", "--model", relative_model_dir, "--modality", "audio",
        "--synthetic", 128, "--output_dir", output_dir, "--max_steps", 16, "--per_device_batch_size", 8,
        "--learning_rate", 3e-3, "--weight_decay", 0, "--lora_r", 4, "--logging_steps", 8,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    # The main process prints the evaluation results (not the last training batch's accuracy), once.
    reports = re.findall(r"\{[^{}]*accuracy[^{}]*\}", result.stdout)
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert reports == [str(results)]
    print(results)
    assert results["accuracy_after"] >= results["accuracy_before"] + 0.4, results
    final = output_dir / "final"
    # The base's path is recorded absolute: the adapter reloads from any working directory.
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(Path(tiny_random_model_dir).resolve())
    saved = load_file(final / "adapter_model.safetensors")
    assert saved and all("lora_" in key or "classification_head" in key for key in saved)
    assert not any(".ffn.image." in key or ".ffn.text." in key for key in saved)
    card = (final / "README.md").read_text()  # ours, not PEFT's blank template
    assert "load_lora_classifier" in card and "AutoProcessor" in card and "More Information Needed" not in card

    # The adapter on a freshly loaded base, with the training set's label names, scores what the run reported.
    processor = AutoProcessor.from_pretrained(final)
    assert isinstance(processor, OnePeaceFeatureExtractor)  # no tokenizer: AutoPeftModel would resize embeddings
    auto = peft.AutoPeftModel.from_pretrained(str(final), import_allowlist=["onepeace_hf"],
                                              **lora_classifier_kwargs(final))
    assert isinstance(auto.get_base_model(), OnePeaceForAudioClassification)
    model = load_lora_classifier(final).eval()
    assert isinstance(model, peft.PeftModel) and isinstance(model.get_base_model(), OnePeaceForAudioClassification)
    data = ClassificationDataArguments(modality="audio", synthetic=128)
    evaluation = load_classification_split(data, "validation", seed=3407)  # the scripts' default seed
    assert list(model.config.id2label.values()) == evaluation.features["label"].names
    evaluate_fn = accuracy_evaluator(ClassificationCollator(processor, "audio", "audio"), evaluation)
    assert evaluate_fn(model)["accuracy"] == pytest.approx(results["accuracy_after"])
