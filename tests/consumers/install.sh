#!/usr/bin/env bash
# Consumers that cannot share the test environment, each in its own folder under .consumers/
# (git ignores it), installed without dependencies over the test environment's packages:
#   trl-1.13.0  the last TRL with PRMTrainer (trl.experimental.prm; removed in TRL 1.14)
#   verl-0.9.1  verl's RLHFDataset and reward routing (verl pins transformers < 5.11 and
#               omegaconf an antlr4 that Math-Verify's does not match, so it stays apart)
# tests/test_consumers.py runs each in a subprocess with PYTHONPATH set to its folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
install() {
  local folder=.consumers/$1; shift
  [ -f "$folder/.complete" ] && return
  rm -rf "$folder"
  python -m pip install -q --no-deps --target "$folder" "$@"
  touch "$folder/.complete"
}
install trl-1.13.0 trl==1.13.0
install verl-0.9.1 verl==0.9.1 omegaconf==2.4.0 antlr4-python3-runtime==4.9.3 tensordict==0.10.0 pyvers orjson \
  codetiming pylatexenc
