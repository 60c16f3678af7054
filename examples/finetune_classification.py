"""Fully fine-tune ONE-PEACE for image or audio classification, with layer-wise LR decay, on one CPU or many GPUs.

    accelerate launch examples/finetune_classification.py --model path/to/converted --modality audio \
        --dataset my/sounds --input_column audio --label_column label --eval_split validation \
        --output_dir runs/classify --num_epochs 10 --per_device_batch_size 32 --learning_rate 5e-5 \
        --layer_decay 0.75 --warmup_ratio 0.1

`--synthetic 512` trains on a generated set instead (offline try). The accuracy on the evaluation split before and
after training goes to `output_dir/eval_results.json`; the model (`output_dir/final`) loads with
`AutoModelForImageClassification` / `AutoModelForAudioClassification`.
"""

import torch
import onepeace_hf  # noqa: F401  (registers ONE-PEACE with the Auto classes)
from accelerate import PartialState
from transformers import AutoProcessor, HfArgumentParser, set_seed

from onepeace_hf.training import TrainingArguments
from onepeace_hf.training.classification import (
    ClassificationDataArguments,
    finetune_classification,
    label_names,
    load_classification_model,
    load_classification_splits,
)
from onepeace_hf.training.recipes import load_before_the_model, parse_script_arguments


def main():
    parser = HfArgumentParser((ClassificationDataArguments, TrainingArguments))
    parser.add_argument("--model", required=True, help="converted ONE-PEACE folder (or Hub id)")
    parser.add_argument("--drop_path_rate", type=float, default=None, help="override (the original uses 0.1-0.4)")
    data, args, extra = parse_script_arguments(parser)
    overrides = {} if extra.drop_path_rate is None else {"drop_path_rate": extra.drop_path_rate}
    train_set, eval_set = load_before_the_model(parser, lambda: load_classification_splits(data, seed=args.seed))
    set_seed(args.seed)  # the new head: the same on every process, and reproducible
    labels = label_names(train_set, data.label_column)
    model = load_classification_model(extra.model, data.modality, labels, dtype=torch.float32, **overrides)
    processor = AutoProcessor.from_pretrained(extra.model)
    result = finetune_classification(model, processor, data, args, train_set=train_set, eval_set=eval_set)
    if PartialState().is_main_process:  # the evaluation results (eval_results.json), not the last training batch's
        print({k: result[k] for k in ("accuracy_before", "accuracy_after") if k in result})


if __name__ == "__main__":
    main()
