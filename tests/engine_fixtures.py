"""Fixtures for engine tests: a tiny random-weight Llama and a byte-level BPE tokenizer trained in
memory, saved as a transformers model folder. No network, about a second to build.

conftest.py imports them with `from tests.engine_fixtures import *  # noqa: F403`.
"""

from __future__ import annotations

import pytest

__all__ = ["tiny_model_dir", "tiny_engine", "tiny_ref_model_dir"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TRAINING_TEXT = [
    "Step 1: Add 2 and 3 to get 5.\n\nStep 2: Multiply 5 by 4 to get 20.\n\nThe answer is \\boxed{20}.",
    "Let x be the number of apples. Then 3x + 2 = 11, so x = 3.\n\n#### 3",
    "We compute the sum 1 + 2 + ... + 10 = 55. The answer is: 55",
    "Solve for y: 2y - 4 = 10. Adding 4 gives 2y = 14, hence y = 7.",
] * 8


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TRAINING_TEXT, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(vocab_size: int, eos_token_id: int, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in the real models
        max_position_embeddings=4096,  # the proposer prompts of intervene's tests run past 1,024
        eos_token_id=eos_token_id,
        pad_token_id=0,
        **extra,
    )


def build_tiny_model(vocab_size: int, eos_token_id: int, seed: int = 0):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab_size, eos_token_id))
    # Larger than default weights make the next-token distributions peaked, so greedy and
    # sampled outputs are not near-uniform noise and ties are practically impossible.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.15)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A transformers model folder (config, safetensors, tokenizer with chat template)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    model = build_tiny_model(len(tokenizer), tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_ref_model_dir(tmp_path_factory):
    """A second tiny model with other random weights and the same tokenizer: a reference model."""
    folder = tmp_path_factory.mktemp("tiny-llama-ref")
    tokenizer = build_tokenizer()
    build_tiny_model(len(tokenizer), tokenizer.eos_token_id, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    """The hf engine on the tiny model, loaded through the folder path, on CPU."""
    from prmtool.engines import load_engine

    engine = load_engine("hf", model=str(tiny_model_dir), device="cpu", max_batch_size=8)
    yield engine
    engine.close()
