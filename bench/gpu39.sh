# GPU checks and benchmarks of issue 39 (run on the device machine from the repo root).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
L=/tmp/gpu39; mkdir -p $L
nvidia-smi --query-gpu=name,memory.total --format=csv > $L/00_smi.log 2>&1
python3 - > $L/01_kernel.log 2>&1 <<'PY'
import torch
from prmtool.engines.hf.kv_cache import gathered_attention, BLOCK_SIZE
from prmtool.engines.hf.kernels import paged_decode
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for H, kvh, D in ((28, 4, 128), (14, 2, 64), (4, 2, 16)):
        NB = 600
        kb = torch.randn(NB, BLOCK_SIZE, kvh, D, device="cuda", dtype=dtype)
        vb = torch.randn_like(kb)
        rows, W = 37, 200
        tables = torch.randint(1, NB, (rows, W), dtype=torch.int32, device="cuda")
        seq_lens = torch.randint(1, W * BLOCK_SIZE, (rows,), device="cuda")
        q = torch.randn(rows, H, 1, D, device="cuda", dtype=dtype)
        out = paged_decode(q.view(rows, H, D), kb, vb, tables, seq_lens, D**-0.5)
        ref = gathered_attention(q.float(), kb.float(), vb.float(), tables.long(), (seq_lens - 1).view(-1, 1), D**-0.5)
        print(dtype, H, kvh, D, "max abs diff", (out.float() - ref.reshape(rows, H, D)).abs().max().item(), flush=True)
PY
python3 bench/bench_generate.py --shape long --arch 7b --engines hf > $L/11_new_7b_long.log 2>&1
timeout 100 python3 -m pytest -q -x tests/test_engines.py -k "cuda_graph or forked or preempted" > $L/02_tests.log 2>&1
python3 bench/bench_generate.py --shape rollout --arch 7b --engines hf > $L/12_new_7b_rollout.log 2>&1
python3 bench/bench_generate.py --shape short --arch 7b --engines hf > $L/13_new_7b_short.log 2>&1
python3 bench/bench_generate.py --shape short --arch 0.5b --engines hf > $L/14_new_05b_short.log 2>&1
PYTHONPATH=$PWD/old_engine:$PWD python3 bench/bench_generate.py --shape long --arch 7b --engines hf > $L/15_old_7b_long.log 2>&1
echo done > $L/99_done
