"""One NPMTrainer step (SGD) on a saved tiny NPM and training set; run alone or under torchrun by test_trainer.py.

Usage: train_one_step.py MODEL_DIR DATASET_DIR OUTPUT_DIR GROUPS_PER_PROCESS
"""

import sys

import datasets

from npm_hf import NPMModel, NPMTrainer, NPMTrainingArguments
from npm_hf.trainer import end_distributed_run


def main(model_dir: str, dataset_dir: str, output_dir: str, groups_per_process: int) -> None:
    dataset = datasets.load_from_disk(dataset_dir)
    group_size = dataset["group"].count(dataset["group"][0])
    model = NPMModel.from_pretrained(model_dir)
    args = NPMTrainingArguments(
        output_dir=output_dir, max_steps=1, per_device_train_batch_size=group_size * groups_per_process,
        optim="sgd", learning_rate=0.5, weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0,
        lr_scheduler_type="constant", shuffle_groups=False, use_cpu=True, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=0,
    )
    trainer = NPMTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    trainer.save_model(output_dir)
    end_distributed_run(trainer)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
