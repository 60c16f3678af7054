r"""Embed a `datasets` dataset column (text, image or audio) with every process of an `accelerate launch`.

    accelerate launch --multi_gpu --num_processes 8 examples/extract_embeddings.py --model onepeace-4b \
        --dataset my/images --split train --column image --modality image --id_columns image_id \
        --output_dir embeddings/images --batch_size 128 --dtype bfloat16

Writes `output_dir/embeddings.parquet` (columns `index`, the `--id_columns`, `embedding`) in input order; run the same
command again to resume after an interruption (any number of processes). Open the result with
`onepeace_hf.embedding_extraction.load_embeddings(output_dir)` or `datasets.Dataset.from_parquet(...)`.
On a machine without GPU, launch CPU processes with `--multi_gpu --num_processes N` (the script then creates
`Accelerator(cpu=True)`; `--cpu --num_processes N`, and `--num_processes N` alone, silently run a single process).
"""

import argparse
import json
import sys
from dataclasses import asdict

import datasets
import torch
from accelerate import Accelerator
from transformers import AutoModel, AutoProcessor

import onepeace_hf  # noqa: F401  (registers ONE-PEACE with the Auto classes)
from onepeace_hf.embedding_extraction import MODALITIES, extract_embeddings
from onepeace_hf.training.recipes import check_model_location, is_saved_to_disk, load_saved_split


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_data(args) -> datasets.Dataset:
    """A Hub name or local loading script/folder, or a `save_to_disk` folder (a DatasetDict takes `--split`)."""
    if is_saved_to_disk(args.dataset):
        dataset = load_saved_split(args.dataset, args.split)
    else:
        dataset = datasets.load_dataset(args.dataset, args.dataset_config, data_dir=args.data_dir, split=args.split)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    return dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or Hub id (encoder weights load with AutoModel)")
    parser.add_argument("--processor", default=None, help="processor folder or Hub id (default: --model)")
    parser.add_argument("--dataset", required=True, help="datasets name or path, or a save_to_disk folder")
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--data_dir", default=None, help="e.g. with --dataset imagefolder / audiofolder")
    parser.add_argument("--split", default="train")
    parser.add_argument("--column", required=True, help="the column to embed")
    parser.add_argument("--modality", required=True, choices=MODALITIES)
    parser.add_argument("--id_columns", nargs="*", default=[], help="columns copied next to the embeddings")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--batch_size", type=int, default=64,
        help="inputs per forward pass; audio of mixed lengths depends on its batch (padding): 1 avoids it",
    )
    parser.add_argument("--chunk_size", type=int, default=1024, help="rows per resumable output file")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--no_normalize", action="store_true", help="keep the embeddings unnormalized")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers for decoding/preprocessing")
    parser.add_argument("--max_samples", type=int, default=None, help="only the first N rows (for tries)")
    parser.add_argument("--stop_after_chunks", type=int, default=None,
                        help="embed at most N chunks per process, then stop (resume by running again)")
    parser.add_argument("--skip_unreadable", action="store_true",
                        help="give rows that cannot be read a null embedding (listed at the end) instead of stopping")
    args = parser.parse_args()
    try:
        check_model_location(args.model)
        check_model_location(args.processor, "processor")
    except ValueError as error:
        parser.error(str(error))

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    try:  # a missing dataset, split or column, a modality that does not fit the column, a changed setting
        dataset = load_data(args)
        model = AutoModel.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(accelerator.device)
        processor = AutoProcessor.from_pretrained(args.processor or args.model)
        summary = extract_embeddings(
            model, processor, dataset, args.column, args.modality, args.output_dir, accelerator,
            batch_size=args.batch_size, chunk_size=args.chunk_size, id_columns=args.id_columns,
            normalize=not args.no_normalize, num_workers=args.num_workers, max_chunks=args.stop_after_chunks,
            skip_unreadable=args.skip_unreadable,
        )
    except (ValueError, FileNotFoundError, ImportError) as error:  # ImportError: a decoder (torchcodec) is missing
        sys.exit(f"error: {error}")
    except datasets.exceptions.DatasetGenerationError as error:  # a dataset builder failed, e.g. audiofolder
        cause = error.__cause__ or error.__context__
        sys.exit(f"error: {error}" + (f" ({type(cause).__name__}: {cause})" if cause else ""))
    if accelerator.is_main_process:
        print(json.dumps({**asdict(summary), "output": summary.output and str(summary.output)}))
        if summary.output is None:
            print("Stopped before the end; run the same command again to resume.")
    accelerator.end_training()


if __name__ == "__main__":
    main()
