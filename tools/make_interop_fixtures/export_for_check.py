"""Import every interop fixture into xlpeft and export it back (run with the *project* venv, see README.md).

    .venv/bin/python tools/make_interop_fixtures/export_for_check.py tests/interop/fixtures /tmp/xlpeft-exports

Writes ``OUT/adapterhub/<case>`` and ``OUT/composable_sft/<case>_<layout>`` for check_exports.py,
which loads them with the home libraries in the foreign venv.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from xlpeft.interop import convert

ADAPTERHUB = {"seq_bn": "tiny-bert", "seq_bn_inv": "tiny-bert", "double_seq_bn": "tiny-bert",
              "double_seq_bn_inv": "tiny-bert", "seq_bn_options": "tiny-bert", "xlmr_seq_bn_inv": "tiny-xlmr",
              "ner_seq_bn": "tiny-bert", "nli_double_seq_bn": "tiny-xlmr"}
COMPOSABLE = {"lang_bert_diffs": "tiny-bert", "lang_xlmr_diffs": "tiny-xlmr", "ner_bert_diffs": "tiny-bert"}


def main(fixtures: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        for case, kind in ADAPTERHUB.items():
            base = str(fixtures / "bases" / kind)
            module = convert(fixtures / "adapterhub" / case, Path(tmp) / case, "adapterhub", base=base)
            convert(module, out / "adapterhub" / case, "xlpeft", "adapterhub")
            if case == "double_seq_bn":
                convert(module, out / "adapterhub" / f"{case}_safetensors", "xlpeft", "adapterhub", safetensors=True)
        for case, kind in COMPOSABLE.items():
            base = str(fixtures / "bases" / kind)
            module = convert(fixtures / "composable_sft" / case, Path(tmp) / case, "composable-sft", base=base)
            stem = case.rsplit("_", 1)[0]
            for layout in ("diffs", "body"):
                convert(module, out / "composable_sft" / f"{stem}_{layout}", "xlpeft", "composable-sft", base=base,
                        layout=layout)
    print(f"exports written under {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
