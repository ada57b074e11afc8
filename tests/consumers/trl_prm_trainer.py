"""TRL 1.13.0's PRMTrainer trains on a `trl-stepwise` export, as a user would run it.

    PYTHONPATH=.consumers/trl-1.13.0 python tests/consumers/trl_prm_trainer.py EXPORT MODEL RUN

tests/test_consumers.py runs it in its own process (TRL 1.13 stays out of the test
environment, whose TRL is current). Prints one JSON line: the training loss, and for the first
row its number of steps and of tokens the trainer labeled (one per step, at its separator).
"""

import json
import sys

import datasets
import trl
from transformers import AutoModelForTokenClassification, AutoTokenizer
from trl.experimental.prm import PRMConfig, PRMTrainer

export, model_dir, run_dir = sys.argv[1:4]
assert trl.__version__ == "1.13.0", trl.__version__
dataset = datasets.load_dataset(
    "parquet", data_files=f"{export}/train/*.parquet", split="train", cache_dir=f"{run_dir}/cache"
)
config = PRMConfig(
    output_dir=run_dir,
    max_steps=2,
    per_device_train_batch_size=2,
    max_length=1000,  # the tiny model's context is 1024
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    logging_steps=1,
)
model = AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=2)
trainer = PRMTrainer(
    model=model, args=config, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model_dir)
)
first = trainer.train_dataset[0]
result = trainer.train()
print(
    json.dumps(
        {
            "loss": result.training_loss,
            "rows": len(dataset),
            "steps_of_first_row": len(dataset[0]["completions"]),
            "labeled_tokens_of_first_row": sum(label != -100 for label in first["labels"]),
        }
    )
)
