"""ONE-PEACE pretraining, one stage per run: vision-language, then audio-language (shared parts frozen).

    # stage 1 from a converted pretraining checkpoint (conversion/convert_original_checkpoint.py --task pretraining)
    accelerate launch --config_file examples/accelerate_configs/fsdp_8gpu_4b.yaml examples/pretrain.py \
        --stage vision_language --model onepeace-4b-pretrain --dataset my/image-captions --image_column image \
        --text_column caption --output_dir runs/stage1 --max_steps 200000 --per_device_batch_size 32 \
        --learning_rate 5e-4 --warmup_steps 3000
    # stage 2 from stage 1's result
    accelerate launch ... examples/pretrain.py --stage audio_language --model runs/stage1/final \
        --dataset my/audio-captions --audio_column audio --text_column caption --output_dir runs/stage2 ...

`--config config.json` starts from random weights instead of `--model`; `--synthetic N` trains on a generated set
(offline try). Masks follow the original's rules and ratios; losses and their weights are the original criteria's.
With `--eval_split`, the retrieval recall after training goes to `output_dir/eval_results.json`.
"""

import torch
from accelerate import PartialState
from transformers import AutoProcessor, HfArgumentParser, set_seed

from onepeace_hf import OnePeaceConfig, OnePeaceForPretraining, OnePeaceProcessor
from onepeace_hf.training import TrainingArguments
from onepeace_hf.training.recipes import (
    PRETRAINING_STAGES,
    DataArguments,
    load_before_the_model,
    load_pair_splits,
    parse_script_arguments,
    pretrain,
)


def main():
    parser = HfArgumentParser((DataArguments, TrainingArguments))
    parser.add_argument("--stage", required=True, choices=PRETRAINING_STAGES,
                        help="vision_language first, then audio_language (only the audio branch trains)")
    parser.add_argument("--model", help="ONE-PEACE folder to start from (decoder kept if it has one)")
    parser.add_argument("--config", help="OnePeaceConfig JSON to start from random weights instead")
    data, args, extra = parse_script_arguments(parser)
    if (extra.model is None) == (extra.config is None):
        parser.error("give exactly one of --model and --config")
    train_set, eval_set = load_before_the_model(parser, lambda: load_pair_splits(data, seed=args.seed))
    set_seed(args.seed)  # weights created here (the decoder; all with --config): reproducible, equal on every process
    if extra.model:
        model = OnePeaceForPretraining.from_pretrained(extra.model, dtype=torch.float32)  # fp32 weights; bf16 via AMP
        processor = AutoProcessor.from_pretrained(extra.model)
    else:
        model = OnePeaceForPretraining(OnePeaceConfig.from_json_file(extra.config))
        processor = OnePeaceProcessor()
    logged = pretrain(model, processor, data, args, extra.stage, train_set=train_set, eval_set=eval_set)
    if PartialState().is_main_process:  # the final evaluation (eval_results.json)
        print({k: v for k, v in logged.items() if k.startswith("eval/")})


if __name__ == "__main__":
    main()
