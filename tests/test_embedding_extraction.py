"""Embedding extraction: equal to calling the model directly, input order kept, resumable without recomputing
finished chunks, refusing to mix models or datasets, and the same result from a real 2-process `accelerate launch`."""

import argparse
import importlib.util
import json
import re
import runpy
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoProcessor

import onepeace_hf  # also registers the Auto classes
from onepeace_hf.embedding_extraction import (
    ExtractionCollator,
    extract_embeddings,
    load_embeddings,
    model_fingerprint,
)
from onepeace_hf.training.synthetic import synthetic_pairs
from tests.launching import accelerate_launch


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "extract_embeddings.py"
NUM_ROWS, CHUNK, BATCH = 7, 3, 2  # chunks of 3, 3, 1 rows; batches of 2 + 1 inside each


@pytest.fixture(scope="module")
def model_and_processor(tiny_random_model_dir):
    return AutoModel.from_pretrained(tiny_random_model_dir).eval(), AutoProcessor.from_pretrained(tiny_random_model_dir)


def make_dataset(source, folder: Path) -> datasets.Dataset:
    """NUM_ROWS rows with an `id` column and one column `value` of the given kind."""
    rows = synthetic_pairs(NUM_ROWS, "audio" if source.startswith("audio") else "image", seed=3)
    ids = [f"item-{i}" for i in range(NUM_ROWS)]
    if source == "text":  # different lengths, so batches are padded differently from one big batch
        values = [text + " and more" * (i % 3) for i, text in enumerate(rows["text"])]
    elif source == "image_path":
        values = []
        for i, image in enumerate(rows["image"]):
            image.resize((24 + 8 * i, 40)).save(folder / f"{i}.png")
            values.append(str(folder / f"{i}.png"))
    elif source == "audio_path":  # one second each, alternately at 16 and 8 kHz: batches mix sampling rates
        values = []
        for i, clip in enumerate(rows["audio"]):
            rate = 16000 if i % 2 == 0 else 8000
            soundfile.write(folder / f"{i}.wav", np.resize(clip["array"], rate), rate, subtype="FLOAT")
            values.append(str(folder / f"{i}.wav"))
    else:
        return rows.add_column("id", ids).rename_column(source, "value")
    return datasets.Dataset.from_dict({"id": ids, "value": values})


def direct_features(model, processor, source, values):
    """All rows in one batch, straight through the processor and get_*_features."""
    with torch.no_grad():
        if source == "text":
            return model.get_text_features(**processor(text=values, return_tensors="pt"))
        if source.startswith("image"):
            return model.get_image_features(**processor(images=values, return_tensors="pt"))
        if source == "audio":
            waves = [value["array"] for value in values]
            return model.get_audio_features(**processor(audio=waves, sampling_rate=16000, return_tensors="pt"))
        # Files of different rates: each clip prepared at its own rate (all last 1 s, so no padding), then batched.
        clips = [processor(audio=wave, sampling_rate=rate) for wave, rate in map(onepeace_hf.load_audio, values)]
        inputs = {key: torch.cat([torch.as_tensor(c[key]) for c in clips]) for key in ("input_values", "padding_mask")}
        return model.get_audio_features(**inputs)


def read(output_dir):
    result = load_embeddings(output_dir)
    return result, result.with_format("torch")[:]["embedding"]


@pytest.mark.parametrize("source", ["text", "image", "image_path", "audio", "audio_path"])
def test_single_process_equals_the_model(model_and_processor, tmp_path, source):
    model, processor = model_and_processor
    dataset = make_dataset(source, tmp_path)
    modality = source.split("_")[0]
    summary = extract_embeddings(model, processor, dataset, "value", modality, tmp_path / "out", batch_size=BATCH,
                                 chunk_size=CHUNK, id_columns=["id"])
    assert (summary.num_chunks, summary.embedded_chunks, summary.reused_chunks) == (3, 3, 0)
    result, embeddings = read(tmp_path / "out")
    assert list(result["index"]) == list(range(NUM_ROWS))
    assert list(result["id"]) == [f"item-{i}" for i in range(NUM_ROWS)]
    values = [dataset[i]["value"] for i in range(NUM_ROWS)]
    expected = F.normalize(direct_features(model, processor, source, values), dim=-1)
    torch.testing.assert_close(embeddings, expected, rtol=0, atol=1e-6)
    assert embeddings.dtype == torch.float32 and embeddings.shape == (NUM_ROWS, model.config.hidden_size)


def test_unnormalized_and_bfloat16(tiny_random_model_dir, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_random_model_dir)
    dataset = make_dataset("text", tmp_path)
    texts = list(dataset["value"])
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModel.from_pretrained(tiny_random_model_dir, dtype=dtype).eval()
        extract_embeddings(model, processor, dataset, "value", "text", tmp_path / str(dtype), batch_size=NUM_ROWS,
                           normalize=False)
        _, embeddings = read(tmp_path / str(dtype))
        expected = direct_features(model, processor, "text", texts).float()
        torch.testing.assert_close(embeddings, expected, rtol=0, atol=1e-6)
    assert not torch.isclose(read(tmp_path / str(torch.float32))[1], embeddings).all()  # bf16 really ran in bf16


def test_resume_skips_finished_chunks(model_and_processor, tmp_path):
    model, processor = model_and_processor
    dataset = make_dataset("image", tmp_path)
    settings = dict(batch_size=BATCH, chunk_size=CHUNK, id_columns=["label"])
    extract_embeddings(model, processor, dataset, "value", "image", tmp_path / "full", **settings)

    stopped = extract_embeddings(model, processor, dataset, "value", "image", tmp_path / "run", max_chunks=1,
                                 **settings)
    assert stopped.output is None and stopped.embedded_chunks == 1
    chunks = tmp_path / "run" / "chunks"
    assert sorted(p.name for p in chunks.iterdir()) == ["chunk_000000.parquet"]
    assert not (tmp_path / "run" / "embeddings.parquet").exists()
    first = (chunks / "chunk_000000.parquet").stat().st_mtime_ns
    # An interrupted write leaves only a `.partial` file; a damaged chunk file is redone as well.
    (chunks / "chunk_000002.parquet.partial").write_bytes(b"half a chunk")
    (chunks / "chunk_000001.parquet").write_bytes(b"not parquet")

    # Resumed with a DataLoader worker (not part of the manifest: it does not change any number).
    resumed = extract_embeddings(model, processor, dataset, "value", "image", tmp_path / "run", num_workers=1,
                                 **settings)
    assert (resumed.embedded_chunks, resumed.reused_chunks) == (2, 1)
    assert (chunks / "chunk_000000.parquet").stat().st_mtime_ns == first
    full, expected = read(tmp_path / "full")
    result, embeddings = read(tmp_path / "run")
    assert list(result["index"]) == list(range(NUM_ROWS))
    assert list(result["label"]) == list(full["label"]) == list(dataset["label"])
    assert torch.equal(embeddings, expected)

    final_mtime = (tmp_path / "run" / "embeddings.parquet").stat().st_mtime_ns
    again = extract_embeddings(model, processor, dataset, "value", "image", tmp_path / "run", **settings)
    assert (again.embedded_chunks, again.reused_chunks) == (0, 3)
    assert (tmp_path / "run" / "embeddings.parquet").stat().st_mtime_ns == final_mtime


def test_refuses_to_mix_results(tiny_random_model_dir, model_and_processor, tmp_path):
    model, processor = model_and_processor
    dataset = make_dataset("text", tmp_path)
    settings = dict(batch_size=BATCH, chunk_size=CHUNK)
    extract_embeddings(model, processor, dataset, "value", "text", tmp_path, max_chunks=1, **settings)

    changed_model = AutoModel.from_pretrained(tiny_random_model_dir).eval()
    assert model_fingerprint(changed_model) == model_fingerprint(model)
    with torch.no_grad():  # one weight, one ulp, in the middle of the largest tensor
        largest = max(changed_model.parameters(), key=torch.Tensor.numel).view(-1)
        largest[largest.numel() // 2 + 1] = torch.nextafter(largest[largest.numel() // 2 + 1], torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"different \['model'\]"):
        extract_embeddings(changed_model, processor, dataset, "value", "text", tmp_path, **settings)
    bf16_model = AutoModel.from_pretrained(tiny_random_model_dir, dtype=torch.bfloat16).eval()
    with pytest.raises(ValueError, match=r"different \['dtype', 'model'\].*fingerprint changes with its dtype"):
        extract_embeddings(bf16_model, processor, dataset, "value", "text", tmp_path, **settings)

    edited = dataset.map(lambda row, i: {"value": row["value"] + "!" * (i == 5)}, with_indices=True)
    with pytest.raises(ValueError, match=r"different \['dataset'\]"):
        extract_embeddings(model, processor, edited, "value", "text", tmp_path, **settings)
    with pytest.raises(ValueError, match=r"different \['batch_size'\]"):
        extract_embeddings(model, processor, dataset, "value", "text", tmp_path, batch_size=3, chunk_size=CHUNK)
    assert json.loads((tmp_path / "manifest.json").read_text())["batch_size"] == BATCH
    # The same settings go on from where they stopped.
    assert extract_embeddings(model, processor, dataset, "value", "text", tmp_path, **settings).embedded_chunks == 2


def test_bad_arguments(model_and_processor, tmp_path):
    model, processor = model_and_processor
    dataset = make_dataset("text", tmp_path)
    with pytest.raises(ValueError, match=r"Columns \['caption'\] are not in the dataset"):
        extract_embeddings(model, processor, dataset, "caption", "text", tmp_path)
    with pytest.raises(ValueError, match="modality must be one of"):
        extract_embeddings(model, processor, dataset, "value", "video", tmp_path)
    images = make_dataset("image", tmp_path)  # a datasets Image feature says what the column holds
    with pytest.raises(ValueError, match=r"Column 'value' holds images \(a datasets Image feature\), not audio"):
        extract_embeddings(model, processor, images, "value", "audio", tmp_path)
    with pytest.raises(ValueError, match="Streaming"):
        extract_embeddings(model, processor, dataset.to_iterable_dataset(), "value", "text", tmp_path)
    with pytest.raises(ValueError, match="empty"):
        extract_embeddings(model, processor, dataset.select([]), "value", "text", tmp_path)
    with pytest.raises(ValueError, match="cannot be named 'index' or 'embedding'"):
        extract_embeddings(model, processor, dataset.rename_column("id", "index"), "value", "text", tmp_path,
                           id_columns=["index"])
    with pytest.raises(ValueError, match="must hold strings"):
        extract_embeddings(model, processor, dataset.rename_column("id", "x").add_column("n", list(range(7))), "n",
                           "text", tmp_path / "numbers")
    with pytest.raises(FileNotFoundError, match="has not finished"):
        load_embeddings(tmp_path / "nothing")


def launch(model_dir, dataset_dir, output_dir, *extra, processes=2):
    result = accelerate_launch(
        SCRIPT, "--model", model_dir, "--dataset", dataset_dir, "--column", "image", "--modality", "image",
        "--id_columns", "label", "--output_dir", output_dir, "--batch_size", BATCH, "--chunk_size", 4, *extra,
        processes=processes,
    )
    summary = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result, summary[-1] if summary else None


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tiny_random_model_dir, tmp_path):
    synthetic_pairs(10, "image", seed=2).save_to_disk(tmp_path / "data")
    dataset = datasets.load_from_disk(tmp_path / "data")
    model = AutoModel.from_pretrained(tiny_random_model_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_random_model_dir)
    extract_embeddings(model, processor, dataset, "image", "image", tmp_path / "single", batch_size=BATCH, chunk_size=4,
                       id_columns=["label"])
    _, expected = read(tmp_path / "single")

    # 10 rows in chunks of 4, 4, 2: process 0 takes chunks 0 and 2, process 1 chunk 1. One chunk each, then stop:
    # chunk 1 existing proves that a second process ran.
    stopped, summary = launch(tiny_random_model_dir, tmp_path / "data", tmp_path / "two", "--stop_after_chunks", 1)
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    assert summary == {"output": None, "num_chunks": 3, "embedded_chunks": 2, "reused_chunks": 0, "skipped_rows": [],
                       "skip_reasons": {}}
    chunks = tmp_path / "two" / "chunks"
    written = {p.name: p.stat().st_mtime_ns for p in chunks.iterdir()}
    assert sorted(written) == ["chunk_000000.parquet", "chunk_000001.parquet"]

    resumed, summary = launch(tiny_random_model_dir, tmp_path / "data", tmp_path / "two")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert summary["embedded_chunks"] == 1 and summary["reused_chunks"] == 2
    assert {name: (chunks / name).stat().st_mtime_ns for name in written} == written  # not recomputed
    result, embeddings = read(tmp_path / "two")
    assert list(result["index"]) == list(range(10)) and list(result["label"]) == list(dataset["label"])
    torch.testing.assert_close(embeddings, expected, rtol=0, atol=1e-6)

    # A mismatch stops every process with the error (none is left waiting for the others).
    mixed, _ = launch(tiny_random_model_dir, tmp_path / "data", tmp_path / "two", "--batch_size", 4)
    assert mixed.returncode != 0 and "different ['batch_size']" in mixed.stderr


def test_a_run_that_failed_before_its_first_chunk_does_not_block_the_corrected_one(model_and_processor, tmp_path):
    model, processor = model_and_processor
    dataset = make_dataset("text", tmp_path)
    output = tmp_path / "out"
    settings = dict(batch_size=BATCH, chunk_size=CHUNK)
    # A wrong modality for the column: fails while embedding the first chunk, after the manifest was written.
    with pytest.raises(Exception):
        extract_embeddings(model, processor, dataset, "value", "image", output, **settings)
    assert (output / "manifest.json").exists() and not any((output / "chunks").glob("*.parquet"))
    result = extract_embeddings(model, processor, dataset, "value", "text", output, **settings)
    assert result.embedded_chunks == -(-len(dataset) // CHUNK)
    assert json.loads((output / "manifest.json").read_text())["modality"] == "text"


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_row_that_cannot_be_read_is_named_and_finished_chunks_stay(model_and_processor, tmp_path, num_workers):
    model, processor = model_and_processor
    dataset = make_dataset("image_path", tmp_path)
    Path(dataset[4]["value"]).write_text("not an image")  # second chunk (rows 3-5), its first batch (rows 3-4)
    output = tmp_path / "out"
    one_line = (r"^Row 4 of column 'value' could not be read.*UnidentifiedImageError: [^\n]*4\.png'\); with "
                r"skip_unreadable \(--skip_unreadable\), unreadable rows get a null embedding")
    with pytest.raises(ValueError, match=one_line):
        extract_embeddings(model, processor, dataset, "value", "image", output, batch_size=BATCH, chunk_size=CHUNK,
                           num_workers=num_workers)
    assert [p.name for p in sorted((output / "chunks").glob("*.parquet"))] == ["chunk_000000.parquet"]

    # The same run, told to skip: the finished chunk is reused, row 4 is null, its batch-mate row 3 embedded alone.
    summary = extract_embeddings(model, processor, dataset, "value", "image", output, batch_size=BATCH,
                                 chunk_size=CHUNK, num_workers=num_workers, skip_unreadable=True)
    assert (summary.reused_chunks, summary.embedded_chunks, summary.skipped_rows) == (1, 2, [4])
    assert list(summary.skip_reasons) == [4] and summary.skip_reasons[4].startswith("UnidentifiedImageError: ")
    result = load_embeddings(output)
    assert result["index"] == list(range(NUM_ROWS)) and result["embedding"][4] is None
    kept = [row for row in range(NUM_ROWS) if row != 4]
    values = [Image.open(dataset[row]["value"]) for row in kept]
    expected = F.normalize(direct_features(model, processor, "image_path", values), dim=-1)
    torch.testing.assert_close(torch.tensor([result["embedding"][row] for row in kept]), expected, atol=1e-5, rtol=0)


def test_a_resumed_run_finishes_and_reports_rows_left_out_by_every_call(model_and_processor, tmp_path):
    """The last chunk (row 6 alone) cannot be read: after a stop, the resuming call reads nothing but must still
    finish, and its summary lists row 1, left out by the first call, as well."""
    model, processor = model_and_processor
    dataset = make_dataset("image_path", tmp_path)
    for row in (1, 6):
        Path(dataset[row]["value"]).write_text("not an image")
    output = tmp_path / "out"
    settings = dict(batch_size=BATCH, chunk_size=CHUNK, skip_unreadable=True)
    first = extract_embeddings(model, processor, dataset, "value", "image", output, max_chunks=2, **settings)
    assert (first.output, first.skipped_rows) == (None, [1])
    last = extract_embeddings(model, processor, dataset, "value", "image", output, **settings)
    assert (last.reused_chunks, last.embedded_chunks, last.skipped_rows) == (2, 1, [1, 6])
    assert set(last.skip_reasons) == {1, 6}
    result = load_embeddings(output)
    assert [row for row, value in enumerate(result["embedding"]) if value is None] == [1, 6]
    again = extract_embeddings(model, processor, dataset, "value", "image", output, **settings)  # nothing to do
    assert (again.embedded_chunks, again.skipped_rows) == (0, [1, 6])


def test_skipping_does_not_hide_a_run_in_which_nothing_can_be_read(model_and_processor, tmp_path, monkeypatch):
    """A wrong modality or a missing decoder fails every row: that is no unreadable row to leave out."""
    model, processor = model_and_processor
    dataset = make_dataset("text", tmp_path)
    output = tmp_path / "out"
    settings = dict(batch_size=BATCH, chunk_size=CHUNK, skip_unreadable=True)
    with pytest.raises(ValueError, match=rf"None of the {NUM_ROWS} rows of column 'value' could be read or "
                                         r"preprocessed as image, so no embeddings were written \(row 0: "):
        extract_embeddings(model, processor, dataset, "value", "image", output, **settings)
    assert not any((output / "chunks").glob("*.parquet"))

    def no_decoder(self, rows):
        raise ImportError("To support decoding images, please install 'a decoder'.")

    monkeypatch.setattr(ExtractionCollator, "__call__", no_decoder)
    with pytest.raises(ImportError, match="a decoder"):
        extract_embeddings(model, processor, dataset, "value", "text", tmp_path / "text", **settings)


def test_the_script_reads_the_asked_split_of_a_saved_folder(tmp_path):
    load_data = runpy.run_path(str(SCRIPT))["load_data"]  # run_name is not __main__: nothing runs

    def arguments(folder, split):
        return argparse.Namespace(dataset=str(folder), split=split, dataset_config=None, data_dir=None, max_samples=None)

    synthetic_pairs(3, "image").save_to_disk(tmp_path / "one")
    assert len(load_data(arguments(tmp_path / "one", "train"))) == 3
    with pytest.raises(ValueError, match="single saved Dataset, which stands for the 'train' split"):
        load_data(arguments(tmp_path / "one", "validation"))
    datasets.DatasetDict({"train": synthetic_pairs(2, "image")}).save_to_disk(tmp_path / "dict")
    with pytest.raises(ValueError, match=r"has no split 'test'; its splits are \['train'\]"):
        load_data(arguments(tmp_path / "dict", "test"))


def test_the_script_reports_a_missing_model_and_a_wrong_column_in_one_line(tiny_random_model_dir, tmp_path,
                                                                          monkeypatch, capsys):
    synthetic_pairs(3, "image").save_to_disk(tmp_path / "data")

    def run(*argv):
        monkeypatch.setattr("sys.argv", ["extract_embeddings.py", "--dataset", str(tmp_path / "data"), "--modality",
                                         "image", "--output_dir", str(tmp_path / "out"), *argv])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(SCRIPT), run_name="__main__")
        return exit_info.value.code, capsys.readouterr().err

    code, err = run("--model", str(tmp_path / "nowhere"), "--column", "image")
    assert code == 2 and err.strip().endswith(f"--model {tmp_path / 'nowhere'}: no such file or folder (nor a Hub "
                                              "model id).") and "Traceback" not in err
    code, err = run("--model", str(tiny_random_model_dir), "--column", "picture")
    assert code == "error: Columns ['picture'] are not in the dataset (columns: ['text', 'label', 'image'])."


@pytest.mark.skipif(importlib.util.find_spec("torchcodec") is not None, reason="datasets decodes audio with torchcodec")
def test_the_script_reports_a_failed_dataset_builder_in_one_line(tiny_random_model_dir, tmp_path, monkeypatch, capsys):
    """datasets' audiofolder needs torchcodec, which onepeace-hf does not install: say so, not a 60-line traceback."""
    (tmp_path / "clips").mkdir()
    soundfile.write(tmp_path / "clips" / "a.wav", np.zeros(16000, dtype=np.float32), 16000)
    monkeypatch.setattr("sys.argv", ["extract_embeddings.py", "--dataset", "audiofolder", "--data_dir",
                                     str(tmp_path / "clips"), "--column", "audio", "--modality", "audio",
                                     "--model", str(tiny_random_model_dir), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert re.fullmatch(r"error: .*\(ImportError: .*torchcodec.*\)", exit_info.value.code), exit_info.value.code


@pytest.mark.slow
def test_two_processes_report_every_skipped_row(tiny_random_model_dir, tmp_path):
    # 10 image paths in chunks of 4, 4, 2: row 2 is in process 0's first chunk, row 5 in process 1's.
    paths = []
    for i, image in enumerate(synthetic_pairs(10, "image", seed=2)["image"]):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    for row in (2, 5):
        Path(paths[row]).write_text("not an image")
    datasets.Dataset.from_dict({"image": paths, "label": list(range(10))}).save_to_disk(tmp_path / "data")
    done, summary = launch(tiny_random_model_dir, tmp_path / "data", tmp_path / "out", "--skip_unreadable")
    assert done.returncode == 0, done.stderr[-4000:]
    assert summary["skipped_rows"] == [2, 5] and summary["embedded_chunks"] == 3
    embeddings = load_embeddings(tmp_path / "out")["embedding"]
    assert [row for row, embedding in enumerate(embeddings) if embedding is None] == [2, 5]
