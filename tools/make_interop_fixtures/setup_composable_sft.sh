#!/usr/bin/env bash
# Make a virtual environment holding composable-sft (cambridgeltl/composable-sft, not on PyPI)
# installed from its source, with a transformers release its trainer supports.
#
#   tools/make_interop_fixtures/setup_composable_sft.sh SRC_DIR [VENV_DIR]
#
# SRC_DIR: a checkout (or `git archive HEAD | tar -x`) of cambridgeltl/composable-sft; the
# fixtures were made from commit 29f7872 (2024-08-09). VENV_DIR defaults to
# tools/make_interop_fixtures/.venv-composable-sft (git-ignored).
#
# Why transformers 4.36.2: composable-sft's trainer overrides Trainer._maybe_log_save_evaluate
# with the 5-argument signature (tr_loss, model, trial, epoch, ignore_keys_for_eval), which
# transformers changed in 4.38 (grad_norm added); its last fix (Jan 2024) targets 4.36's Trainer.
# torch is installed first and pinned, so no CUDA build is pulled.
set -euo pipefail
SRC=${1:?usage: setup_composable_sft.sh SRC_DIR [VENV_DIR]}
VENV=${2:-$(dirname "$0")/.venv-composable-sft}
python3.11 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "transformers==4.36.2" "accelerate==0.25.0" "numpy<2" "safetensors" torch==2.13.0
# composable-sft's own dependencies (setup.py), then the package itself without resolving them again
"$VENV/bin/pip" install -q conllu seqeval torch==2.13.0
"$VENV/bin/pip" install -q --no-deps "$SRC"
# `import sft` imports sft.multisource, which imports `datasets`; numpy < 2 (transformers 4.36)
# needs a pyarrow built against numpy 1.x
"$VENV/bin/pip" install -q "datasets==2.16.1" "pyarrow==14.0.2" torch==2.13.0 "numpy<2"
"$VENV/bin/python" -c "import sft, transformers, torch; print('composable-sft ok; transformers', transformers.__version__, 'torch', torch.__version__)"
