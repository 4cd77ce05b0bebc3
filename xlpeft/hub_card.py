"""What ``xlpeft push`` sends to the Hugging Face Hub: the module's files and a generated model card.

The card (``README.md``) opens with the Hub's YAML metadata (``library_name: xlpeft``, ``base_model``,
``language``, ``tags``, ``license`` when given) and says what the module is, on which base, for which
language or task, with which method and how many trainable parameters, what it was trained on, the
metrics it reached, how to compose it with xlpeft commands, and the BibTeX of the method's paper.
The papers are found from the method's help line in the registry (what ``xlpeft methods`` prints),
so a method is cited by the paper its help names, never by a table of method names.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from xlpeft.errors import XlpeftError
from xlpeft.io import LoadedModule

CARD = "README.md"

CITATIONS: dict[str, str] = {
    "MAD-X": """@inproceedings{pfeiffer-etal-2020-mad,
  title = {{MAD-X}: An Adapter-Based Framework for Multi-Task Cross-Lingual Transfer},
  author = {Pfeiffer, Jonas and Vuli{\\'c}, Ivan and Gurevych, Iryna and Ruder, Sebastian},
  booktitle = {Proceedings of the 2020 Conference on Empirical Methods in Natural Language Processing (EMNLP)},
  year = {2020},
  pages = {7654--7673}
}""",
    "LT-SFT": """@inproceedings{ansell-etal-2022-composable,
  title = {Composable Sparse Fine-Tuning for Cross-Lingual Transfer},
  author = {Ansell, Alan and Ponti, Edoardo Maria and Korhonen, Anna and Vuli{\\'c}, Ivan},
  booktitle = {Proceedings of the 60th Annual Meeting of the Association for Computational Linguistics (ACL)},
  year = {2022},
  pages = {1778--1796}
}""",
    "Hu et al. 2022": """@inproceedings{hu2022lora,
  title = {{LoRA}: Low-Rank Adaptation of Large Language Models},
  author = {Hu, Edward J. and Shen, Yelong and Wallis, Phillip and Allen-Zhu, Zeyuan and Li, Yuanzhi and Wang, Shean and Wang, Lu and Chen, Weizhu},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year = {2022}
}""",
    "Liu et al. 2024": """@inproceedings{liu2024dora,
  title = {{DoRA}: Weight-Decomposed Low-Rank Adaptation},
  author = {Liu, Shih-Yang and Wang, Chien-Yi and Yin, Hongxu and Molchanov, Pavlo and Wang, Yu-Chiang Frank and Cheng, Kwang-Ting and Chen, Min-Hung},
  booktitle = {International Conference on Machine Learning (ICML)},
  year = {2024}
}""",
    "Liu et al. 2022": """@inproceedings{liu2022fewshot,
  title = {Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning},
  author = {Liu, Haokun and Tam, Derek and Muqeeth, Mohammed and Mohta, Jay and Huang, Tenghao and Bansal, Mohit and Raffel, Colin},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year = {2022}
}""",
    "Karimi Mahabadi et al. 2021": """@inproceedings{karimi-mahabadi2021compacter,
  title = {Compacter: Efficient Low-Rank Hypercomplex Adapter Layers},
  author = {Karimi Mahabadi, Rabeeh and Henderson, James and Ruder, Sebastian},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year = {2021}
}""",
    "AdapterFusion (Pfeiffer et al. 2021)": """@inproceedings{pfeiffer-etal-2021-adapterfusion,
  title = {{AdapterFusion}: Non-Destructive Task Composition for Transfer Learning},
  author = {Pfeiffer, Jonas and Kamath, Aishwarya and R{\"u}ckl{\'e}, Andreas and Cho, Kyunghyun and Gurevych, Iryna},
  booktitle = {Proceedings of the 16th Conference of the European Chapter of the Association for Computational Linguistics: Main Volume (EACL)},
  year = {2021},
  pages = {487--503}
}""",
    "He et al. 2022": """@inproceedings{he2022unified,
  title = {Towards a Unified View of Parameter-Efficient Transfer Learning},
  author = {He, Junxian and Zhou, Chunting and Ma, Xuezhe and Berg-Kirkpatrick, Taylor and Neubig, Graham},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year = {2022}
}""",
    "Li & Liang 2021": """@inproceedings{li-liang-2021-prefix,
  title = {Prefix-Tuning: Optimizing Continuous Prompts for Generation},
  author = {Li, Xiang Lisa and Liang, Percy},
  booktitle = {Proceedings of the 59th Annual Meeting of the Association for Computational Linguistics and the 11th International Joint Conference on Natural Language Processing (ACL-IJCNLP)},
  year = {2021},
  pages = {4582--4597}
}""",
    "Lester et al. 2021": """@inproceedings{lester-etal-2021-power,
  title = {The Power of Scale for Parameter-Efficient Prompt Tuning},
  author = {Lester, Brian and Al-Rfou, Rami and Constant, Noah},
  booktitle = {Proceedings of the 2021 Conference on Empirical Methods in Natural Language Processing (EMNLP)},
  year = {2021},
  pages = {3045--3059}
}""",
}
"""BibTeX by the phrase a method's help line names its paper with (``LoRA (Hu et al. 2022): ...``)."""

_CODE = re.compile(r"[a-z]{2,3}")


def citations(method_help: str) -> list[str]:
    """The BibTeX entries of the papers ``method_help`` names, in the table's order."""
    return [bib for phrase, bib in CITATIONS.items() if phrase in method_help]


def hub_base_id(name: str) -> str | None:
    """The base's hub id for ``base_model``: an alias's, a hub id itself, or one read off a hub cache path."""
    from xlpeft.models import ALIASES

    if name in ALIASES:
        return ALIASES[name]
    cached = re.search(r"models--([^/\\]+?)--([^/\\]+)", name)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not os.path.exists(name):
        return name
    return None


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _front_matter(module: LoadedModule, license_id: str | None) -> list[str]:
    m = module.manifest
    base_id = hub_base_id(str(m.base.get("name", "")))
    tags = ["xlpeft", f"{m.kind}-module", m.method, "cross-lingual-transfer", *([m.task] if m.task else [])]
    lines = ["---", "library_name: xlpeft"]
    lines += [f"base_model: {base_id}"] if base_id else []
    lines += ["language:", f"- {m.lang}"] if m.lang and _CODE.fullmatch(m.lang) else []
    lines += [f"license: {license_id}"] if license_id else []
    return [*lines, "tags:", *(f"- {t}" for t in tags), "---", ""]


def _public(entry: object) -> str:
    """A data description fit for a public card: a local file by its name only, never the uploader's path."""
    text = str(entry)
    return os.path.basename(text) + " (a local file)" if os.path.isabs(text) else text


def _training(m) -> list[str]:
    t = m.training or {}
    data = t.get("corpora") or t.get("train_data") or (m.extra.get("imported") or {}).get("format")
    lines = ["## Training", ""]
    if isinstance(data, list):
        lines += [f"- data: {', '.join(_public(d) for d in data)}"]
    elif data:
        lines += [f"- data: {'imported from ' if 'imported' in m.extra else ''}{_public(data)}"]
    lines += [f"- {k}: {t[k]}" for k in ("steps", "seed") if k in t]
    metrics = {k: v for k, v in t.items() if k.startswith("eval_") and isinstance(v, int | float)}
    metrics |= {k if k.startswith("eval_") else f"eval_{k}": v for k, v in (t.get("eval") or {}).items()
                if isinstance(v, int | float)}
    if not (data or metrics or "steps" in t):
        lines += ["- not recorded in the manifest"]
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k.removeprefix('eval_')} | {v:.4f} |" for k, v in sorted(metrics.items())]
    else:
        lines += ["none recorded"]
    if t.get("metric"):
        lines += ["", f"Main metric: {t['metric']}."]
    return [*lines, ""]


def base_arg(name: str) -> str:
    """How a reader names the base: an xlpeft alias or a hub id as recorded, else the placeholder ``BASE``.

    A local directory is never written into a public card (it would only leak the uploader's paths).
    """
    from xlpeft.models import ALIASES, PREPARED_BASES, TINY_BASES

    if name in ALIASES or name in TINY_BASES or name in PREPARED_BASES:
        return name
    return hub_base_id(name) or "BASE"


def _usage(m, repo_id: str) -> list[str]:
    base, ref = base_arg(str(m.base.get("name", ""))), f"hf:{repo_id}"
    if m.kind == "language":
        lines = ["Train a task module over it (on source-language data), then compose the two:", "", "```",
                 f"xlpeft train-task --task TASK --lang SOURCE_LANG --base {base} --set lang_module={ref}", "```", ""]
        py = f'model = xlpeft.compose("{base}", ["{ref}", "TASK_MODULE_DIR_OR_NAME"])'
    else:
        lines = ["Compose it over a language module of the target language:", ""]
        py = f'model = xlpeft.compose("{base}", ["LANG_MODULE_DIR_OR_NAME", "{ref}"])'
    note = "" if base != "BASE" else " (`BASE`: the base whose fingerprint is given above)"
    from xlpeft.vocab import NewVocab

    vocab_of = NewVocab.from_extra(m.extra)
    words = list(vocab_of.tokens) if vocab_of else []
    kind = "whole-word tokens" if vocab_of is None or vocab_of.unit == "word" else "sub-word pieces"
    vocab = [f"It adds {len(words):,} {kind} to the base's vocabulary (e.g. {', '.join(words[:5])}): "
             "tokenize its inputs with `model.xlpeft_tokenizer`, which holds them.", ""] if words else []
    return ["## How to use it", "", *lines, f"In Python{note}:", "", "```python", "import xlpeft", "", py, "```", "",
            *vocab,
            f"`{ref}@REVISION` pins a revision; with `HF_HUB_OFFLINE=1` xlpeft reads the Hugging Face cache only.", ""]


def model_card(module: LoadedModule, repo_id: str, license_id: str | None = None) -> str:
    """The ``README.md`` of ``module`` pushed to ``repo_id``.

    Raises:
        XlpeftError: the module's method is not registered here (its help and papers are unknown).
    """
    from xlpeft.registry import get_method

    m = module.manifest
    spec = get_method(m.method)
    what = (f"language `{m.lang}`" if m.kind == "language" else
            f"task `{m.task}`" + (f" (trained on `{m.lang}` data)" if m.lang else ""))
    base = base_arg(str(m.base.get("name", "")))
    shown = f"`{base}`" if base != "BASE" else "a local model directory"
    size = sum(t.numel() for state in module.tensors.values() for t in state.values())
    head = sum(t.numel() for t in module.tensors.get("head", {}).values())
    lines = [*_front_matter(module, license_id), f"# {repo_id}", "",
             f"An xlpeft {m.kind} module for {what}: {spec.help}.", "",
             "| | |", "|---|---|",
             f"| base | {shown} ({m.base.get('model_type')}, fingerprint `{m.base.get('fingerprint')}`) |",
             f"| kind | {m.kind} |", f"| method | {m.method} |",
             f"| trainable parameters | {m.trainable_parameters or size:,} |",
             f"| stored tensors | {size:,} values{f' (head {head:,})' if head else ''} |",
             f"| xlpeft | {m.xlpeft_version or '?'} (module format {m.format_version}) |", "",
             "Method configuration:", "", "```json", json.dumps(m.config, indent=2, sort_keys=True), "```", "",
             *_training(m), *_usage(m, repo_id), "## Citation", ""]
    bibs = citations(spec.help)
    lines += ["```bibtex", "\n\n".join(bibs), "```"] if bibs else [f"The method: {spec.help}."]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PushPlan:
    """The files a push uploads (relative name, size in bytes), the card among them, and where to."""

    module_dir: Path
    repo_id: str
    files: tuple[tuple[str, int], ...]
    card: str

    def describe(self, revision: str | None, private: bool) -> list[str]:
        lines = [f"push {self.module_dir} to {self.repo_id} (branch {revision or 'main'}, "
                 f"{'private' if private else 'public'}): {len(self.files) + 1} files"]
        lines += [f"  {name:<40} {_human(size):>10}" for name, size in self.files]
        lines += [f"  {CARD:<40} {_human(len(self.card.encode())):>10}  (generated model card)"]
        return lines


def plan_push(module: LoadedModule, repo_id: str, license_id: str | None = None) -> PushPlan:
    """Every file of the module directory (hidden ones and an old card left out) plus the generated card."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", repo_id) or ".." in repo_id:
        raise XlpeftError(f"expected a hub repository ORG/REPO (e.g. my-org/lang-sw-adapter); got {repo_id!r}")
    root = Path(module.path)
    files = tuple((p.relative_to(root).as_posix(), p.stat().st_size) for p in sorted(root.rglob("*"))
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
                  and p.relative_to(root).as_posix() != CARD)
    return PushPlan(root, repo_id, files, model_card(module, repo_id, license_id))


__all__ = ["CARD", "CITATIONS", "PushPlan", "base_arg", "citations", "hub_base_id", "model_card", "plan_push"]
