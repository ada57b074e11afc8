"""verl 0.9.1 reads a `verl` export as its PPO trainer does, and scores it.

    PYTHONPATH=.consumers/verl-0.9.1 python tests/consumers/verl_rows.py EXPORT MODEL RUN

tests/test_consumers.py runs it in its own process (verl pins transformers < 5.11 and an
antlr4 of its own, so it stays out of the test environment). It loads EXPORT/train.parquet with
verl's RLHFDataset (prompt key, overlong-prompt filter with the model's chat template), renders
a row's prompt as verl's agent loop does, and scores a right and a wrong `\\boxed{}` answer with
verl's built-in routing by data_source and with prmtool's reward loaded by verl's own loader
(`reward.custom_reward_function.path/name`). Prints one JSON line.
"""

import json
import sys

import verl
from omegaconf import OmegaConf
from transformers import AutoTokenizer
from verl.trainer.ppo.reward import get_custom_reward_fn
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.utils.reward_score import default_compute_score

import prmtool.integrations.verl_reward as prmtool_reward

export, model_dir, run_dir = sys.argv[1:4]
assert verl.__version__ == "0.9.1", verl.__version__
tokenizer = AutoTokenizer.from_pretrained(model_dir)
data_config = OmegaConf.create(
    {
        "prompt_key": "prompt",
        "max_prompt_length": 1000,  # the tiny model's context is 1024
        "filter_overlong_prompts": True,  # verl's default: renders every prompt with the chat template
        "cache_dir": f"{run_dir}/cache",
    }
)
dataset = RLHFDataset(data_files=[f"{export}/train.parquet"], tokenizer=tokenizer, config=data_config)
row = dataset[0]
prompt = tokenizer.apply_chat_template(row["raw_prompt"], add_generation_prompt=True, tokenize=False)
truth = row["reward_model"]["ground_truth"]
right, wrong = f"So the answer is \\boxed{{{truth}}}.", "So the answer is \\boxed{-12345}."
reward_config = OmegaConf.create(
    {"reward": {"custom_reward_function": {"path": prmtool_reward.__file__, "name": "compute_score"}}}
)
reward = get_custom_reward_fn(reward_config)


def scored(function, answer):
    return float(
        function(data_source=row["data_source"], solution_str=answer, ground_truth=truth, extra_info=row["extra_info"])
    )


print(
    json.dumps(
        {
            "rows": len(dataset),
            "data_source": row["data_source"],
            "prompt": prompt,
            "ground_truth": truth,
            "extra_info": {key: row["extra_info"][key] for key in ("split", "index", "problem_id")},
            "builtin_reward": [scored(default_compute_score, right), scored(default_compute_score, wrong)],
            "prmtool_reward": [scored(reward, right), scored(reward, wrong)],
        }
    )
)
