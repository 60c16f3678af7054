"""Fine-tune ONE-PEACE for image-text or audio-text retrieval (contrastive loss only), on one CPU or many GPUs.

    accelerate launch examples/finetune_retrieval.py --model path/to/converted --dataset my/pairs \
        --image_column image --text_column caption --eval_split validation --output_dir runs/retrieval \
        --num_epochs 5 --per_device_batch_size 32 --learning_rate 8e-5 --layer_decay 0.9 --warmup_ratio 0.1

`--synthetic 512` trains on a generated set instead (offline try). Add `--resume_from_checkpoint latest` to continue
an interrupted run. The recall on the evaluation split after training goes to `output_dir/eval_results.json`; the
result (`output_dir/final`) loads with `AutoModel.from_pretrained`.
"""

import torch
import onepeace_hf  # noqa: F401  (registers ONE-PEACE with the Auto classes)
from accelerate import PartialState
from transformers import AutoModel, AutoProcessor, HfArgumentParser, set_seed

from onepeace_hf.training import TrainingArguments
from onepeace_hf.training.recipes import (
    DataArguments,
    finetune_retrieval,
    load_before_the_model,
    load_pair_splits,
    parse_script_arguments,
)


def main():
    parser = HfArgumentParser((DataArguments, TrainingArguments))
    parser.add_argument("--model", required=True, help="converted ONE-PEACE folder (or Hub id)")
    parser.add_argument("--drop_path_rate", type=float, default=None, help="override (the original uses 0.5)")
    data, args, extra = parse_script_arguments(parser)
    overrides = {} if extra.drop_path_rate is None else {"drop_path_rate": extra.drop_path_rate}
    train_set, eval_set = load_before_the_model(parser, lambda: load_pair_splits(data, seed=args.seed))
    set_seed(args.seed)  # weights the folder lacks (e.g. projections of a backbone) are created reproducibly
    model = AutoModel.from_pretrained(extra.model, dtype=torch.float32, **overrides)  # fp32 weights; bf16 via AMP
    processor = AutoProcessor.from_pretrained(extra.model)
    logged = finetune_retrieval(model, processor, data, args, train_set=train_set, eval_set=eval_set)
    if PartialState().is_main_process:  # the final evaluation (eval_results.json)
        print({k: v for k, v in logged.items() if k.startswith("eval/")})


if __name__ == "__main__":
    main()
