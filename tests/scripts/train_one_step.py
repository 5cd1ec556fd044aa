"""One NPMTrainer step (SGD) on a saved tiny NPM and training set; run alone, under torchrun or under
`accelerate launch` (DDP or FSDP) by test_trainer.py.

Usage: train_one_step.py MODEL_DIR DATASET_DIR OUTPUT_DIR GROUPS_PER_PROCESS [REPORT_JSON [FSDP_VERSION]]
With REPORT_JSON, process 0 writes there how the run was distributed (world size, wrapper, sharded parameters);
with FSDP_VERSION (1 or 2) the Trainer shards the model with FSDP (FULL_SHARD), set through TrainingArguments.
"""

import json
import sys

import datasets

from npm_hf import NPMModel, NPMTrainer, NPMTrainingArguments
from npm_hf.trainer import end_distributed_run


def main(model_dir: str, dataset_dir: str, output_dir: str, groups_per_process: int, report: str | None = None,
         fsdp_version: int | None = None) -> None:
    dataset = datasets.load_from_disk(dataset_dir)
    group_size = dataset["group"].count(dataset["group"][0])
    model = NPMModel.from_pretrained(model_dir)
    fsdp = {}
    if fsdp_version == 1:  # on CPU FSDP1 cannot sync module states (nor the RAM-efficient loading that needs it)
        fsdp = {"fsdp": "full_shard", "fsdp_config": {"version": 1, "sync_module_states": False}}
    elif fsdp_version == 2:
        fsdp = {"fsdp": "full_shard", "fsdp_config": {"version": 2}}
    args = NPMTrainingArguments(
        output_dir=output_dir, max_steps=1, per_device_train_batch_size=group_size * groups_per_process,
        optim="sgd", learning_rate=0.5, weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0,
        lr_scheduler_type="constant", shuffle_groups=False, use_cpu=True, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=0, **fsdp,
    )
    trainer = NPMTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    trainer.save_model(output_dir)
    if report and trainer.is_world_process_zero():
        with open(report, "w") as handle:
            json.dump({"world_size": trainer.args.world_size, "fsdp": bool(trainer.is_fsdp_enabled),
                       "wrapper": type(trainer.model_wrapped).__name__,
                       "sharded_parameters": sum(type(p).__name__ == "DTensor" for p in trainer.model.parameters())},
                      handle)
    end_distributed_run(trainer)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:6], *map(int, sys.argv[6:7]))
