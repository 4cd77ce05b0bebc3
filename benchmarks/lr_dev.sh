#!/bin/bash
# Learning rates of the prefix and Compacter modules chosen on ENGLISH development data only (issue 18):
# the POS task modules are scored on Brown's dev split (train-task's eval_accuracy), the MLM language modules
# on held-out English Bible blocks (train-lang's eval_loss, 5% of the blocks). No target language is looked at.
# The recipe is pipelines/pos-methods.yaml's (e5-small-bible, seed 2, 100 task steps of 16 sentences,
# 60 MLM steps of 8 x 64 tokens). Run from a folder where `xlpeft run pipelines/pos-universal.yaml` has
# prepared the data and the base; COMPACTER_EN is an English Compacter language module to train the task
# module over (pos-methods.yaml's lang-en-compacter of seed 2; it was trained at the old lr 1e-4).
#   COMPACTER_EN=modules/pos-universal/e5-small-bible/s2/lang-en-compacter bash benchmarks/lr_dev.sh OUT_DIR
set -u
OUT=${1:?usage: COMPACTER_EN=DIR bash benchmarks/lr_dev.sh OUT_DIR}
X=${XLPEFT:-xlpeft}
mkdir -p "$OUT"
task() {
  name=$1; shift
  $X train-task --task pos --lang en --base e5-small-bible --seed 2 --max-steps 100 --batch-size 16 \
    --output "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1 || { echo "$name: failed, see $OUT/$name.log"; return; }
  python3 -c "import json,sys; t=json.load(open(sys.argv[1]))['training']; print(f\"{sys.argv[2]:<28} Brown dev accuracy {t['eval']['eval_accuracy']:.3f}\")" "$OUT/$name/xlpeft.json" "$name"
}
lang() {
  name=$1; shift
  $X train-lang --lang en --base e5-small-bible --corpus offline --seed 2 --max-steps 60 --batch-size 8 \
    --set max_seq_len=64 --output "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1 || { echo "$name: failed, see $OUT/$name.log"; return; }
  python3 -c "import json,sys; t=json.load(open(sys.argv[1]))['training']; print(f\"{sys.argv[2]:<28} held-out MLM loss {t['eval_loss_before']:.3f} -> {t['eval_loss']:.3f}\")" "$OUT/$name/xlpeft.json" "$name"
}
task task-prefix-1e-2 --method prefix --set lang_module=none --set lr=1e-2
task task-prefix-1e-3 --method prefix --set lang_module=none --set lr=1e-3
task task-prefix-direct-1e-2 --method prefix --set lang_module=none --set lr=1e-2 --set reparameterise=false
task task-compacter-1e-4 --method compacter --set "lang_module=${COMPACTER_EN:?set COMPACTER_EN}" --set lr=1e-4
task task-compacter-1e-3 --method compacter --set "lang_module=$COMPACTER_EN" --set lr=1e-3
task task-compacter-3e-3 --method compacter --set "lang_module=$COMPACTER_EN" --set lr=3e-3
lang lang-prefix-1e-2 --method prefix --set lr=1e-2
lang lang-prefix-1e-3 --method prefix --set lr=1e-3
lang lang-prefix-1e-4 --method prefix --set lr=1e-4
lang lang-prefix-direct-1e-2 --method prefix --set lr=1e-2 --set reparameterise=false
lang lang-compacter-1e-4 --method compacter --set lr=1e-4
lang lang-compacter-3e-3 --method compacter --set lr=3e-3
