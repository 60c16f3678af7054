"""The training loop on Accelerate: one process to many GPUs (DDP, FSDP or DeepSpeed from Accelerate's own config),
mixed precision, gradient accumulation and clipping, checkpoints with exact resume, and logging of every loss term.

`train(model, criterion, dataset, collate_fn, args)` is all a script needs; the criterion is any callable
`criterion(model, **batch) -> dict` with a `loss` entry (see `onepeace_hf.losses`).
"""

import json
import logging
import math
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .compilation import regional_compilation, training_recompile_limit
from .objectives import TrainingObjective
from .optimization import cosine_schedule_with_warmup, create_optimizer


logger = logging.getLogger(__name__)
# What `accelerate launch` exports for a DeepSpeed or FSDP config.
SHARDING_FLAGS = {"DeepSpeed": "ACCELERATE_USE_DEEPSPEED", "FSDP": "ACCELERATE_USE_FSDP"}

CHECKPOINT_PREFIX = "step_"
LOG_NAME = "training_log.jsonl"
HALF_DTYPES = (torch.float16, torch.bfloat16)
MIXED_PRECISIONS = (None, "no", "fp16", "bf16", "fp8")  # None: what `accelerate launch` configured


def _help(default, text: str):
    """A dataclass field with its `--help` text (HfArgumentParser reads `metadata["help"]`)."""
    return field(default=default, metadata={"help": text})


@dataclass
class TrainingArguments:
    """Settings of a run. Defaults follow the original's vision-language pretraining recipe where it has one.

    Batch sizes are per process; the effective batch is per_device_batch_size x processes x accumulation steps.
    Give `max_steps` or `num_epochs` (optimizer steps are counted after accumulation).
    """

    output_dir: str = field(metadata={"help": "checkpoints/, final/ and training_log.jsonl go here"})
    max_steps: int | None = _help(None, "optimizer steps to train for (or --num_epochs)")
    num_epochs: int | None = _help(None, "passes over the training split (or --max_steps)")
    per_device_batch_size: int = _help(32, "rows per process and micro-batch")
    gradient_accumulation_steps: int = _help(1, "micro-batches per optimizer step")
    learning_rate: float = _help(5e-4, "peak learning rate, reached after the warmup")
    min_lr: float = _help(1e-6, "learning rate at the end of the cosine decay")
    weight_decay: float = _help(0.05, "AdamW weight decay (not on biases, 1-D weights and position embeddings)")
    layer_decay: float = _help(
        1.0, "layer-wise LR decay: fusion layer i of n trains at lr x layer_decay^(n + 1 - i), the adapters at "
        "lr x layer_decay^(n + 1), the rest at lr"
    )
    adam_beta1: float = _help(0.9, "AdamW beta1")
    adam_beta2: float = _help(0.98, "AdamW beta2")
    adam_eps: float = _help(1e-8, "AdamW epsilon")
    warmup_steps: int | None = _help(None, "linear warmup steps (default: --warmup_ratio of all steps)")
    warmup_ratio: float = _help(0.0, "warmup as a fraction of all steps, when --warmup_steps is not given")
    max_grad_norm: float | None = _help(3.0, "clip the gradient norm to this (0: no clipping)")
    mixed_precision: str | None = _help(None, "no | fp16 | bf16 (default: what `accelerate launch` configured)")
    gradient_checkpointing: bool = _help(False, "recompute activations in the backward pass to save memory")
    seed: int = _help(3407, "seed of the data order, dropout and new weights")
    dataloader_num_workers: int = _help(0, "data loading worker processes per training process")
    logging_steps: int = _help(10, "log the averaged metrics every this many optimizer steps")
    save_steps: int | None = _help(None, "save a checkpoint every this many steps (and always at the end)")
    save_total_limit: int | None = _help(2, "checkpoints to keep (the newest); None keeps all")
    eval_steps: int | None = _help(None, "evaluate every this many steps (always at the end with an eval set)")
    resume_from_checkpoint: str | None = _help(
        None, "a checkpoint folder, or 'latest' (the newest complete one under output_dir/checkpoints)"
    )
    overwrite_output_dir: bool = _help(
        False, "start over in an output_dir that holds a previous run's log, checkpoints and results"
    )
    stop_after_steps: int | None = _help(None, "end the run early after this step (and its save), as a preemption")
    find_unused_parameters: bool = _help(True, "DDP: criteria leave whole modality branches unused in a step")
    report_to: list[str] = field(
        default_factory=list, metadata={"help": "Accelerate trackers to log to, e.g. tensorboard wandb"}
    )

    def __post_init__(self):
        if (self.max_steps is None) == (self.num_epochs is None):
            raise ValueError("Give exactly one of max_steps and num_epochs.")
        if self.per_device_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("per_device_batch_size and gradient_accumulation_steps must be >= 1.")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}.")
        counts = {"max_steps": self.max_steps, "num_epochs": self.num_epochs, "logging_steps": self.logging_steps,
                  "save_steps": self.save_steps, "eval_steps": self.eval_steps}
        for name, value in counts.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= (self.max_steps or self.warmup_steps):
            raise ValueError(f"warmup_steps must be in [0, max_steps {self.max_steps}], got {self.warmup_steps}.")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}.")
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("mixed_precision fp16 needs a CUDA GPU: on CPU Accelerate ignores it and trains in "
                             "float32. Use bf16 (or no).")
        if self.save_total_limit is not None and self.save_total_limit < 0:
            raise ValueError(f"save_total_limit must be >= 0 (0 or None keeps every checkpoint), got "
                             f"{self.save_total_limit}.")
        if not 0.0 <= self.min_lr < self.learning_rate:
            raise ValueError(
                f"min_lr ({self.min_lr}) must be in [0, learning_rate {self.learning_rate}): pass a lower --min_lr."
            )
        if self.report_to in (["none"], "none"):  # transformers' spelling of "no trackers"
            self.report_to = []


@dataclass
class TrainingProgress:
    """Where the run is; saved with every checkpoint so that a resumed run continues at the same batch."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict):
        for key, value in state.items():
            setattr(self, key, value)


class WithExampleIndex(torch.utils.data.Dataset):
    """Rows with their dataset index as `example_index`, for collators whose randomness follows the example."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return {**self.dataset[index], "example_index": index}


def enable_activation_checkpointing(model: torch.nn.Module, use_reentrant: bool = False) -> None:
    """Recompute each layer's activations in the backward pass. transformers 5.2x renamed
    `gradient_checkpointing_enable` to `activation_checkpointing_enable` (the old name gives a FutureWarning); 5.17 has
    only the old one."""
    options = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def warn_if_trained_in_half_precision(model: torch.nn.Module) -> None:
    """Warn when trainable weights are bf16/fp16 (e.g. a checkpoint loaded with its stored dtype): AdamW updates
    smaller than the weights' precision are lost, so some parameters stop moving. Mixed precision wants float32
    weights, with `--mixed_precision bf16` computing in bf16."""
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype in HALF_DTYPES})
    if dtypes:
        logger.warning(
            "Training %s weights in %s: small updates are lost. Load the model with dtype=torch.float32 and use "
            "mixed precision (--mixed_precision bf16) for half-precision compute.", type(model).__name__,
            " and ".join(dtypes),
        )


def create_accelerator(args: TrainingArguments) -> Accelerator:
    """Accelerator for the current launch; CPU-only machines run every process on the CPU (gloo)."""
    cpu_only = not torch.cuda.is_available()
    # Accelerate shards with DeepSpeed or FSDP on accelerators only; on CPU it drops the plugin without a word.
    dropped = [name for name, flag in SHARDING_FLAGS.items() if os.environ.get(flag, "false").lower() == "true"]
    if cpu_only and dropped:
        logger.warning(
            "The Accelerate config asks for %s, which Accelerate runs on GPUs only: this CPU run trains with plain "
            "data parallelism (every process holds the whole model).", dropped[0],
        )
    accelerator = Accelerator(
        cpu=cpu_only,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters)],
        log_with=args.report_to or None,
        project_dir=args.output_dir,
    )
    # An Accelerate config's value (exported by `accelerate launch`) silently wins over the argument in Accelerator.
    if accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:
        raise ValueError(
            f"The Accelerate config sets gradient_accumulation_steps={accelerator.gradient_accumulation_steps}, the "
            f"arguments {args.gradient_accumulation_steps}: remove it from the config (or give the same value)."
        )
    if accelerator.state.deepspeed_plugin is not None:
        fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, args)
    return accelerator


def fill_deepspeed_config(config: dict, args: TrainingArguments) -> None:
    """DeepSpeed clips and accumulates itself: as transformers' Trainer does, its "auto" (or absent) values come
    from the arguments, and a value that contradicts them is an error rather than one silently ignored."""
    wanted = {
        "gradient_clipping": args.max_grad_norm or 0.0,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
    }
    for key, value in wanted.items():
        current = config.get(key, "auto")
        if current == "auto":
            config[key] = value
        elif float(current) != float(value):
            raise ValueError(
                f"The DeepSpeed config sets {key}={current}, the arguments {value}: set it to \"auto\" (or remove it) "
                "to take the arguments' value."
            )


def refuse_previous_run(args: TrainingArguments) -> bool:
    """Raise when output_dir holds a previous run that these arguments neither continue nor replace; True when
    they replace it. Scripts call it before loading anything, `train` again before removing anything."""
    output_dir = Path(args.output_dir)
    if args.resume_from_checkpoint:
        try:
            find_checkpoint(output_dir, args.resume_from_checkpoint)
        except FileNotFoundError as error:
            raise ValueError(str(error)) from None
        return False
    previous = [path for path in (output_dir / LOG_NAME, output_dir / "checkpoints") if path.exists()]
    if not previous:
        return False
    if not args.overwrite_output_dir:
        raise ValueError(
            f"{output_dir} holds a previous run ({', '.join(path.name for path in previous)}): continue it with "
            "--resume_from_checkpoint latest, start over with --overwrite_output_dir, or choose another --output_dir."
        )
    return True


def clear_previous_run(args: TrainingArguments, accelerator: Accelerator) -> None:
    """A new run must not append to a previous run's log or mix with its checkpoints: continue it, or start over
    only when asked to."""
    if not refuse_previous_run(args):
        return
    output_dir = Path(args.output_dir)
    accelerator.wait_for_everyone()  # every process has looked before the main one removes anything
    if accelerator.is_main_process:  # everything a run writes: a stale final/ or accuracy would pass for this run's
        (output_dir / LOG_NAME).unlink(missing_ok=True)
        (output_dir / "eval_results.json").unlink(missing_ok=True)
        for folder in ("checkpoints", "final"):
            shutil.rmtree(output_dir / folder, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_checkpoint(output_dir: str | os.PathLike, which: str) -> Path:
    """The folder to resume from: `which` itself, or the newest under output_dir/checkpoints for "latest"."""
    if which != "latest":
        path = Path(which)
        if not path.is_dir():
            raise FileNotFoundError(f"No checkpoint folder at {path}.")
        # Every layout (plain, FSDP, DeepSpeed) holds the registered scheduler and progress as custom_checkpoint_*.
        if not any(path.glob("custom_checkpoint_*.pkl")):
            raise FileNotFoundError(
                f"{path} is not a training checkpoint (a final/ model folder has no optimizer or data position). "
                f"Give one of {Path(output_dir) / 'checkpoints' / (CHECKPOINT_PREFIX + '*')}, or 'latest'."
            )
        return path
    checkpoints = sorted((Path(output_dir) / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))
    # Checkpoints are renamed into place once saved; one without its progress file was damaged afterwards.
    complete = [path for path in checkpoints if any(path.glob("custom_checkpoint_*.pkl"))]
    if not checkpoints:
        raise FileNotFoundError(f"resume_from_checkpoint='latest' but {output_dir}/checkpoints has no checkpoint.")
    if not complete:
        raise FileNotFoundError(f"resume_from_checkpoint='latest' but the checkpoints in {output_dir}/checkpoints "
                                "are incomplete (no custom_checkpoint_*.pkl).")
    if complete[-1] != checkpoints[-1]:
        logger.warning("Resuming from %s: the newer %s is incomplete.", complete[-1].name,
                       ", ".join(path.name for path in checkpoints if path > complete[-1]))
    return complete[-1]


class _Metrics:
    """Running sums of the criterion's scalar outputs between two log lines (skipped DCL terms counted apart)."""

    def __init__(self):
        self.sums, self.counts, self.skipped = defaultdict(float), defaultdict(int), defaultdict(int)

    def add(self, output: dict):
        for name, value in output.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                self.sums[name] += value.detach().float().item()
                self.counts[name] += 1
        for name in output.get("skipped", ()):
            self.skipped[name] += 1

    def averages(self, accelerator: Accelerator) -> dict[str, float]:
        """Means over steps and processes; skip counts summed. Every process reduces the same names in the same
        order, also when a term was skipped on some processes only (a reduce of unequal tensors fails or hangs)."""
        local = sorted(set(self.sums) | {f"skipped/{name}" for name in self.skipped})
        names = sorted(set(gather_object(local))) if accelerator.num_processes > 1 else local
        if not names:
            return {}
        rows = [
            [self.skipped[name.removeprefix("skipped/")], 1] if name.startswith("skipped/") else
            [self.sums.get(name, 0.0), self.counts.get(name, 0)] for name in names
        ]
        total = accelerator.reduce(torch.tensor(rows, device=accelerator.device), reduction="sum")
        result = {}
        for name, (value, count) in zip(names, total.tolist()):
            if name.startswith("skipped/"):
                result[name] = int(value)
            elif name.endswith("_ncorrect"):  # counted per process: the log shows the whole batch's count
                result[name] = value / count * accelerator.num_processes if count else float("nan")
            else:
                result[name] = value / count if count else float("nan")
        return result


@training_recompile_limit()
def train(
    model: torch.nn.Module,
    criterion: Callable[..., dict],
    train_dataset,
    collate_fn: Callable,
    args: TrainingArguments,
    evaluate_fn: Callable[[torch.nn.Module], dict] | None = None,
    accelerator: Accelerator | None = None,
    save_fn: Callable[[torch.nn.Module, str], None] | None = None,
) -> dict:
    """Train `model` with `criterion` on `train_dataset` and save the result under `output_dir/final`.

    evaluate_fn(unwrapped_model) -> metrics runs every `eval_steps` and at the end, on every process (it may gather).
    save_fn(unwrapped_model, folder) adds files to the final folder on the main process (e.g. the processor).
    Returns the last logged metrics.
    """
    accelerator = accelerator or create_accelerator(args)
    clear_previous_run(args, accelerator)
    if args.eval_steps and evaluate_fn is None:
        logger.warning("--eval_steps %d is set, but there is nothing to evaluate on (no --eval_split).",
                       args.eval_steps)
    set_seed(args.seed)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    warn_if_trained_in_half_precision(model)
    objective = TrainingObjective(model, criterion)
    optimizer = create_optimizer(
        model, args.learning_rate, args.weight_decay, args.layer_decay, (args.adam_beta1, args.adam_beta2),
        args.adam_eps,
    )
    if getattr(collate_fn, "uses_example_index", False):
        train_dataset = WithExampleIndex(train_dataset)
    dataloader = DataLoader(
        train_dataset, batch_size=args.per_device_batch_size, shuffle=True, drop_last=True, collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        # Its own generator: creating an iterator must not draw from the global RNG that dropout / drop-path use,
        # or a resumed run (which creates its iterator at another point of that stream) would diverge.
        generator=torch.Generator().manual_seed(args.seed),
    )
    with regional_compilation(accelerator, model):  # when `accelerate launch --dynamo_use_regional_compilation`
        objective, optimizer, dataloader = accelerator.prepare(objective, optimizer, dataloader)
    if len(dataloader) < args.gradient_accumulation_steps:
        raise ValueError(
            f"The training set ({len(train_dataset)} rows) is smaller than one optimizer step: "
            f"{args.per_device_batch_size} rows per batch x {accelerator.num_processes} processes x "
            f"{args.gradient_accumulation_steps} accumulation steps (an incomplete batch is dropped). Lower "
            "--per_device_batch_size or --gradient_accumulation_steps."
        )
    # Accelerate also steps on an epoch's last, incomplete accumulation (as transformers' Trainer counts it).
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps or args.num_epochs * steps_per_epoch
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * total_steps)
    # Not prepared: Accelerate would step a prepared scheduler once per process per step.
    scheduler = cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps, args.min_lr)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(scheduler, progress)
    adapters_only = checkpoint_only_trained_weights_of_adapters(accelerator, objective)
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        accelerator.load_state(str(checkpoint), strict=not adapters_only)
        logger.info("Resumed from %s at step %d", checkpoint, progress.step)
    if args.report_to:
        accelerator.init_trackers("onepeace", config={k: v for k, v in asdict(args).items() if k != "report_to"})

    bar = tqdm(total=total_steps, initial=progress.step, desc="training", disable=not accelerator.is_main_process)
    metrics, logged = _Metrics(), {}
    log_path = Path(args.output_dir) / LOG_NAME
    stop_at = min(total_steps, args.stop_after_steps or total_steps)
    while progress.step < stop_at:
        dataloader.set_epoch(progress.epoch)
        if hasattr(collate_fn, "set_epoch"):  # e.g. the masking collator draws per (seed, epoch, example)
            collate_fn.set_epoch(progress.epoch)
        batches = dataloader
        if progress.batches_in_epoch:
            batches = accelerator.skip_first_batches(dataloader, progress.batches_in_epoch)
        for batch in batches:
            with accelerator.accumulate(objective):
                output = objective(**batch)
                accelerator.backward(output["loss"])
                if accelerator.sync_gradients and args.max_grad_norm:
                    output["grad_norm"] = accelerator.clip_grad_norm_(objective.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            progress.batches_in_epoch += 1
            metrics.add(output)
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            progress.step += 1
            bar.update(1)
            if progress.step % args.logging_steps == 0 or progress.step == stop_at:
                logged = {**metrics.averages(accelerator), "lr": scheduler.get_last_lr()[-1], "epoch": progress.epoch}
                metrics = _Metrics()
                _log(accelerator, logged, progress.step, log_path, bar)
            if args.eval_steps and progress.step % args.eval_steps == 0 and evaluate_fn is not None:
                evaluation = _evaluate(evaluate_fn, accelerator, objective)
                logged.update(evaluation)
                _log(accelerator, evaluation, progress.step, log_path, bar)
            if (args.save_steps and progress.step % args.save_steps == 0) or progress.step == stop_at:
                save_checkpoint(accelerator, args, progress.step)
            if progress.step >= stop_at:
                break
        else:
            progress.epoch += 1
            progress.batches_in_epoch = 0
    bar.close()
    if progress.step >= total_steps:
        evaluated_now = bool(args.eval_steps) and progress.step % args.eval_steps == 0
        if evaluate_fn is not None and not evaluated_now:
            evaluation = _evaluate(evaluate_fn, accelerator, objective)
            logged.update(evaluation)
            _log(accelerator, evaluation, progress.step, log_path, None)
        save_final_model(accelerator, objective, Path(args.output_dir) / "final", save_fn)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return logged


def _evaluate(evaluate_fn, accelerator, objective) -> dict:
    model = accelerator.unwrap_model(objective).model
    model.eval()
    with torch.no_grad():
        result = evaluate_fn(model)
    model.train()
    return {f"eval/{k}": v for k, v in result.items()}


def _log(accelerator: Accelerator, values: dict, step: int, log_path: Path, bar) -> None:
    values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
    accelerator.log(values, step=step)
    if accelerator.is_main_process:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        # NaN metrics are those with nothing to count this step; a NaN loss is divergence, and is shown and warned.
        shown = {
            k: f"{v:.4g}" for k, v in values.items() if isinstance(v, float) and (k == "loss" or not math.isnan(v))
        }
        if not math.isfinite(values.get("loss", 0.0)):
            logger.warning("The loss is %s at step %d: training has diverged (check the learning rate and the "
                           "starting weights).", values["loss"], step)
        if bar is not None:
            bar.set_postfix({k: shown[k] for k in list(shown)[:4]}, refresh=False)
        logger.info("step %d: %s", step, shown)


def checkpoint_only_trained_weights_of_adapters(accelerator: Accelerator, objective) -> bool:
    """For a PEFT model, checkpoints hold only the trained weights (adapters, saved modules), as transformers' Trainer
    does: the frozen base is the one `--model` loads again on resume, and a 4B base would add 16 GB per checkpoint.
    Returns whether this applies; the checkpoint is then loaded non-strictly, after checking it has every trained
    weight. (FSDP and DeepSpeed write their own checkpoint formats, which this leaves alone.)"""
    if not hasattr(accelerator.unwrap_model(objective).model, "peft_config"):
        return False

    def trained_names(model) -> set[str]:
        return {name for name, parameter in model.named_parameters() if parameter.requires_grad}

    def keep_trained_weights(models, weights, output_dir):
        for model, state in zip(models, weights):
            for name in state.keys() - trained_names(model):
                del state[name]

    def check_trained_weights_are_there(models, input_dir):
        from safetensors import safe_open

        for index, model in enumerate(models):
            path = Path(input_dir) / (f"model_{index}.safetensors" if index else "model.safetensors")
            if not path.exists():  # FSDP / DeepSpeed layouts, or a pickled checkpoint: loaded as they are
                continue
            with safe_open(path, "pt") as saved:
                missing = trained_names(model) - set(saved.keys())
            if missing:
                raise ValueError(f"{path} lacks {len(missing)} trained weights of this model, e.g. "
                                 f"{sorted(missing)[:3]}: it was saved from another model or adapter configuration.")

    accelerator.register_save_state_pre_hook(keep_trained_weights)
    accelerator.register_load_state_pre_hook(check_trained_weights_are_there)
    return True


def save_checkpoint(accelerator: Accelerator, args: TrainingArguments, step: int) -> Path:
    """Model, optimizer, scheduler, RNG states and data position, for an exact resume; prunes old checkpoints."""
    folder = Path(args.output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
    # Written under a hidden name and renamed when complete: a run killed while saving leaves no checkpoint that
    # "latest" would pick.
    partial = _partial(folder) if accelerator.is_main_process else _partial_name(folder)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _swap_in(partial, folder)
    if accelerator.is_main_process and args.save_total_limit:
        checkpoints = sorted(folder.parent.glob(f"{CHECKPOINT_PREFIX}*"))
        for old in checkpoints[: -args.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def save_final_model(accelerator: Accelerator, objective, folder: Path, save_fn=None) -> None:
    """`save_pretrained` of the trained model (full weights gathered from FSDP/DeepSpeed shards if needed)."""
    state = accelerator.get_state_dict(objective)
    model = accelerator.unwrap_model(objective).model
    if accelerator.is_main_process:  # into an empty folder, then swapped in: no file of an earlier final/ stays
        model_state = {re.sub(r"^model\.", "", k): v for k, v in state.items() if k.startswith("model.")}
        partial = _partial(folder)
        model.save_pretrained(partial, state_dict=model_state)
        if save_fn is not None:
            save_fn(model, str(partial))
        _swap_in(partial, folder)
    accelerator.wait_for_everyone()


def _partial_name(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.partial")


def _partial(folder: Path) -> Path:
    """The hidden folder `folder` is written under (emptied of an interrupted earlier attempt)."""
    partial = _partial_name(folder)
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def _swap_in(partial: Path, folder: Path) -> None:
    """Replace `folder` whole by its completed `partial`: nothing of an earlier one stays."""
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
