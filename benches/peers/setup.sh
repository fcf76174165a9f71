#!/usr/bin/env bash
# Makes the peers' virtualenvs for bench-peers, from PyPI: .venv-kserve (kserve + onnxruntime)
# and .venv-mlserver (mlserver + onnxruntime), each skipped when already there. Separate venvs:
# one resolver run for both pins an old MLServer.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! .venv-kserve/bin/python -c 'import kserve, onnxruntime' 2>/dev/null; then
  python3 -m venv .venv-kserve
  .venv-kserve/bin/pip install --quiet --disable-pip-version-check "kserve==0.*" "onnxruntime==1.*"
fi
if ! .venv-mlserver/bin/python -c 'import mlserver, onnxruntime' 2>/dev/null; then
  python3 -m venv .venv-mlserver
  .venv-mlserver/bin/pip install --quiet --disable-pip-version-check "mlserver==1.*" "onnxruntime==1.*"
fi
.venv-kserve/bin/pip list 2>/dev/null | grep -i -E '^(kserve|onnxruntime) '
.venv-mlserver/bin/pip list 2>/dev/null | grep -i -E '^(mlserver|onnxruntime) '
