#!/usr/bin/env bash
# The README's "Your first GPU run", as written, on a random-weight Qwen2.5-7B: builds the model
# folder (the real model's sizes, bf16, a word-level tokenizer over its 152,064 ids), then runs
# the README's commands one after another and times each. Speed does not depend on the weights;
# what the weights decide, the model folder fixes so the lengths are a 7B's on GSM8K: 1 id in 300
# ends a response (about 300 tokens each) and 1 in 60 decodes as a blank line (a step about
# every 60 tokens). No answer of a random model is right, so every response is wrong and label
# searches all of them: an upper bound of label's work (a trained 7B gets most GSM8K problems
# right, and label trusts the right ones).
#
#   bench/first_gpu_run.sh build    # the model folder only (a minute or two)
#   bench/first_gpu_run.sh          # the README's commands (the time: README, "Your first GPU run")
#   bench/first_gpu_run.sh k        # then label with --set label.k=4 and 16 (label onward reruns)
#   bench/first_gpu_run.sh n        # generate with --set generate.n=4 and 16, each in its own workdir
#
# MODEL (default /tmp/qwen2.5-7b-random) is built once and reused; the runs write the recipe's
# workdir (work/gsm8k-7b; runs/gsm8k-7b-nN for n); the log (every command's stderr, with a
# progress line every 30 s) and the timings go to WORK: $OUT where set (the GPU machine's output
# folder, so a run cut short still reports), else runs/first-gpu-run. --engine auto picks vLLM
# where it is installed and faster, and says so; without vLLM it runs hf and says why. SMOKE=1:
# a 4-problem, 32-token check of the script on CPU with a tiny model of the same shape of files.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
prmtool() { python -m prmtool "$@"; }  # this checkout's prmtool, whatever is installed

what=${1:-main}
MODEL=${MODEL:-/tmp/qwen2.5-7b-random}
WORK=${WORK:-${OUT:-runs/first-gpu-run}}  # on the GPU machine, straight into $OUT: a run cut short still reports
mkdir -p "$WORK"
LOG="$WORK/first_gpu_run.log"
TIMES="$WORK/first_gpu_run_times.txt"
extra=()
if [[ "${SMOKE:-0}" == 1 ]]; then
    head -4 data_samples/gsm8k/test_sample.jsonl > "$WORK/smoke_problems.jsonl"
    extra=(--set "import.input=$(realpath "$WORK")/smoke_problems.jsonl" --set generate.max-tokens=32 --set label.max-tokens=32)
fi

say() { echo "$*" | tee -a "$TIMES"; }

# One README command, timed; its stderr (plain progress lines every 30 s) goes to the log.
timed() {
    local started milliseconds
    echo "\$ prmtool $*" >> "$LOG"
    started=$(date +%s%N)
    if ! prmtool "$@" ${extra[@]+"${extra[@]}"} 2>> "$LOG"; then
        say "FAILED: prmtool $*"
        tail -5 "$LOG"
        exit 1
    fi
    milliseconds=$(( ($(date +%s%N) - started) / 1000000 ))
    say "$(printf '%6d.%01d s  prmtool %s' $((milliseconds / 1000)) $((milliseconds % 1000 / 100)) "$*")"
    tail -3 "$LOG" | sed 's/^/    /'
}

# Rows of every stage directory of a workdir, from their manifests.
rows() {
    python - "$1" <<'EOF' | tee -a "$TIMES"
import json, sys
from pathlib import Path

for stage in sorted(Path(sys.argv[1]).glob("[0-9][0-9]-*")):
    manifest = stage / "_SUCCESS"
    if manifest.is_file():
        outputs = json.loads(manifest.read_text()).get("outputs", [])
        print(f"    {stage.name}: {sum(o['rows'] for o in outputs):,} rows")
EOF
}

say "== first GPU run ($what), $(date -u '+%Y-%m-%d %H:%M UTC')"
say "$(python -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")')"
say "$(python -c 'import vllm; print("vllm", vllm.__version__)' 2>/dev/null || echo 'vllm: not importable (--engine auto runs hf and says why)')"

if [[ ! -f "$MODEL/config.json" ]]; then
    started=$(date +%s)
    python - "$MODEL" "${SMOKE:-0}" <<'EOF'
"""A random-weight Qwen2.5-7B folder, as `huggingface-cli download` leaves a real one."""
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

folder, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
sizes = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
             num_key_value_heads=4, vocab_size=152064)  # Qwen2.5-7B-Instruct's config.json
if smoke:
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=3000)
vocab = sizes["vocab_size"]
END_OF_TURN, STEP_EVERY, END_EVERY = vocab - 1, 60, 300
specials = {"<|endoftext|>": vocab - 3, "<|im_start|>": vocab - 2, "<|im_end|>": END_OF_TURN}
words = {("\n\n" if i % STEP_EVERY == 0 else "") + f"w{i}": i for i in range(vocab - 3)}
backend = Tokenizer(models.WordLevel({**words, **specials}, unk_token="w2"))
backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
    additional_special_tokens=["<|im_start|>"],
    chat_template=(
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
)
config = Qwen2Config(**sizes, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, use_sliding_window=False, bos_token_id=None,
                     eos_token_id=END_OF_TURN, pad_token_id=vocab - 3)
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)  # 15 GB of weights, made in place on the GPU
with torch.device(device):
    model = Qwen2ForCausalLM(config)
ends = sorted({END_OF_TURN, *range(1, vocab - 3, END_EVERY)})  # about 1 token in 300 ends a response
model.generation_config = GenerationConfig(eos_token_id=ends, pad_token_id=vocab - 3)
model.save_pretrained(folder, max_shard_size="5GB")
tokenizer.save_pretrained(folder)
print(f"{folder}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, random weights")
EOF
    say "$(printf '%6d s  built %s' "$(( $(date +%s) - started ))" "$MODEL")"
fi

case "$what" in
build) ;;  # the model folder only (a first call; the next reuses it while the machine stays warm)
main)
    # The README's commands, as written there (the recipe's workdir: work/gsm8k-7b).
    timed run recipes/gsm8k-7b.yaml --model "$MODEL" --dry-run
    timed run recipes/gsm8k-7b.yaml --model "$MODEL"
    rows work/gsm8k-7b
    timed run recipes/gsm8k-7b.yaml --model "$MODEL"            # complete: every stage skipped
    timed run recipes/gsm8k-7b.yaml --model "$MODEL" --dry-run  # now timed by this run's rates
    ;;
k)
    for k in 4 16; do  # label and the stages after it rerun; generate's responses are kept
        timed run recipes/gsm8k-7b.yaml --model "$MODEL" --set label.k=$k
        rows work/gsm8k-7b
    done
    ;;
n)
    for n in 4 16; do
        timed run recipes/gsm8k-7b.yaml --model "$MODEL" --set generate.n=$n --workdir "runs/gsm8k-7b-n$n"
        rows "runs/gsm8k-7b-n$n"
    done
    ;;
*)
    echo "usage: bench/first_gpu_run.sh [build|main|k|n]" >&2
    exit 2
    ;;
esac
say "== done; the log: $LOG"
