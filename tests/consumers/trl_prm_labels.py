"""Where TRL 1.13.0's PRMTrainer puts its labels on a `trl-stepwise` export, as its own
`tokenize_row` computes them (what it trains on, before padding).

    PYTHONPATH=.consumers/trl-1.13.0 python tests/consumers/trl_prm_labels.py EXPORT MODEL

Prints one JSON line: for each row, its input ids, the positions that carry a label (not -100)
and the labels there.
"""

import json
import sys

import polars as pl
import trl
from transformers import AutoTokenizer
from trl.experimental.prm import PRMConfig, PRMTrainer

export, model_dir = sys.argv[1:3]
assert trl.__version__ == "1.13.0", trl.__version__
tokenizer = AutoTokenizer.from_pretrained(model_dir)
config = PRMConfig(output_dir="unused", report_to=[], use_cpu=True)  # for its default step_separator
rows = []
for features in pl.read_parquet(f"{export}/train/*.parquet").iter_rows(named=True):
    tokenized = PRMTrainer.tokenize_row(
        features,
        tokenizer,
        config.step_separator,
        max_length=None,  # whole rows: truncation is compared apart
        max_completion_length=None,
        train_on_last_step_only=False,
        is_eval=False,
    )
    labelled = [i for i, label in enumerate(tokenized["labels"]) if label != -100]
    rows.append(
        {
            "input_ids": tokenized["input_ids"],
            "positions": labelled,
            "labels": [tokenized["labels"][i] for i in labelled],
        }
    )
print(json.dumps({"separator": config.step_separator, "rows": rows}))
