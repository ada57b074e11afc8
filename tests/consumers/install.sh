#!/usr/bin/env bash
# Consumers that cannot share the test environment, each in its own folder under .consumers/
# (git ignores it), installed without dependencies over the test environment's packages:
#   trl-1.13.0  the last TRL with PRMTrainer (trl.experimental.prm; removed in TRL 1.14)
#   verl-0.9.1  verl's RLHFDataset and reward routing (verl pins transformers < 5.11 and
#               omegaconf an antlr4 that Math-Verify's does not match, so it stays apart)
# Without dependencies, each folder holds every module its consumer imports on the tests' paths
# that the test environment (`pip install -e '.[test,ray]'`) lacks: verl imports cloudpickle
# (through tensordict) and ray; TRL 1.13 imports nothing the test environment lacks. Checked in a
# fresh venv without system site-packages.
# tests/test_consumers.py runs each in a subprocess with PYTHONPATH set to its folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
install() {
  local folder=.consumers/$1; shift
  # .complete lists what the folder holds: a folder from an older list is installed again
  [ "$(cat "$folder/.complete" 2>/dev/null)" = "$*" ] && return
  rm -rf "$folder"
  python -m pip install -q --no-deps --target "$folder" "$@"
  echo "$*" >"$folder/.complete"
}
install trl-1.13.0 trl==1.13.0
python -c 'import ray' 2>/dev/null || {
  echo "verl imports ray: install the test environment with the ray extra (pip install -e '.[test,ray]')" >&2
  exit 1
}
install verl-0.9.1 verl==0.9.1 omegaconf==2.4.0 antlr4-python3-runtime==4.9.3 tensordict==0.10.0 pyvers orjson \
  codetiming pylatexenc cloudpickle==3.1.3
