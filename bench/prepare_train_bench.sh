#!/usr/bin/env bash
# Fetch what bench/bench_train.py needs beyond a machine with prmtool's dependencies (torch,
# transformers, accelerate, datasets): TRL 1.13.0, the last TRL with PRMTrainer, as a wheel,
# without its dependencies (those it needs are prmtool's own). The GPU machine has no network:
# carry the folder there and run
#   PYTHONPATH=. python bench/bench_train.py --trl-wheels bench/wheels
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
python -m pip download -q --no-deps --only-binary=:all: --dest wheels trl==1.13.0
du -sh wheels
ls wheels
