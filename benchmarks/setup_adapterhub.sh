#!/usr/bin/env bash
# Create benchmarks/.venv-adapterhub: the AdapterHub `adapters` library 1.3.0 in its own virtual
# environment, because it pins its own transformers (adapters 1.3.0 requires transformers~=4.57.6,
# xlpeft runs on transformers 5.x).
#
#     bash benchmarks/setup_adapterhub.sh            # then: .venv/bin/python benchmarks/run.py
#
# torch is installed first and pinned, so that the `adapters` requirements never pull a multi-GB
# CUDA build on a CPU machine. On a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC=torch==2.13.0 with a
# CUDA index configured) before running this script.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${ADAPTERHUB_VENV:-$HERE/.venv-adapterhub}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
# Keep torch where it is while adapters brings in its pinned transformers.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "adapters==1.3.0" "$TORCH_SPEC"
"$VENV/bin/python" - <<'PY'
import adapters, torch, transformers
print(f"AdapterHub venv ready: adapters {adapters.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
PY
