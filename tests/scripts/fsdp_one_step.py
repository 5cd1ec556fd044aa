"""One SGD step of NPM's contrastive loss on a model sharded with torch's FSDP2 (`fully_shard`: each encoder
layer, then the whole model), without the Trainer; run under torchrun by test_trainer.py (1 or 2 CPU processes,
gloo). The examples are split evenly between the processes; process 0 saves the full (gathered) weights.

Usage: fsdp_one_step.py MODEL_DIR DATASET_DIR OUTPUT_FILE REPORT_JSON
"""

import json
import sys

import datasets
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoTokenizer

from npm_hf import NPMContrastiveLoss, NPMModel, NPMSpanCollator


def main(model_dir: str, dataset_dir: str, output_file: str, report: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dataset = datasets.load_from_disk(dataset_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = NPMModel.from_pretrained(model_dir).train()
    for layer in model.encoder.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    share = len(dataset) // world
    rows = [dataset[i] for i in range(rank * share, (rank + 1) * share)]
    batch = NPMSpanCollator(tokenizer, mode=model.config.mode, max_length=model.config.max_input_length)(rows)
    NPMContrastiveLoss(model)(model, batch).backward()
    optimizer.step()
    sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_file({key: value.contiguous() for key, value in weights.items()}, output_file)
        with open(report, "w") as handle:
            json.dump({"world_size": world, "sharded_parameters": sharded,
                       "parameters": len(list(model.parameters()))}, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
