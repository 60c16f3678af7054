"""Launched by tests/test_training_distributed.py with `accelerate launch --num_processes 2`: one training step of
the retrieval objective on this process's half of a fixed batch, under DDP; the main process saves the
(DDP-averaged) gradients so the test can compare them with one process on the whole batch."""

import sys

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor

import onepeace_hf  # noqa: F401
from onepeace_hf.losses import RetrievalContrastiveLoss
from onepeace_hf.training import TrainingObjective
from onepeace_hf.training.data import PairCollator
from onepeace_hf.training.synthetic import synthetic_pairs


def main(model_dir: str, out_file: str, per_process: int, detach_negatives: bool):
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    model = AutoModel.from_pretrained(model_dir, drop_path_rate=0.0).train()
    collate = PairCollator(AutoProcessor.from_pretrained(model_dir), image_column="image")
    rows = synthetic_pairs(per_process * accelerator.num_processes, seed=1)
    start = accelerator.process_index * per_process
    batch = collate([rows[i] for i in range(start, start + per_process)])
    objective = accelerator.prepare(TrainingObjective(model, RetrievalContrastiveLoss(detach_negatives=detach_negatives)))
    loss = objective(**batch)["loss"]
    accelerator.backward(loss)
    if accelerator.is_main_process:
        grads = {n: p.grad.contiguous() for n, p in accelerator.unwrap_model(objective).model.named_parameters()
                 if p.grad is not None}
        save_file(grads, out_file)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "detach")
