"""torchrun data parallelism on CPU (gloo): one MLflow run, one artifact, written by rank 0; and 2 ranks
compute what one process computes on the same global batch (issue 14, defect 6)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.methods.fused_inputs import cli_settings
from tests.tiers import cli_methods
from xlpeft import load_module, tracking

# Per-method settings that keep a tiny run tiny (LT-SFT's default K is larger than a tiny base).
SMALL = {"sft": ["--set", "num_params=1500"], "compacter": ["--set", "reduction_factor=4"],
         "parallel": ["--set", "adapter_drop=1"]}  # parallel: its rows also check AdapterDrop draws the same on each rank


def _env(workdir):
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
            "XLPEFT_CACHE": str(workdir / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _xlpeft(workdir, nproc: int, *args: str) -> subprocess.CompletedProcess:
    launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [])
    cmd = [sys.executable, *launcher, "-m", "xlpeft", *args]
    proc = subprocess.run(cmd, env=_env(workdir), cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture
def nodrop_base(base_dirs, tmp_path):
    """The tiny BERT with dropout off, so 2 ranks and 1 process must agree to float precision."""
    target = tmp_path / "tiny-bert-nodrop"
    shutil.copytree(base_dirs["tiny-bert"], target)
    config = json.loads((target / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (target / "config.json").write_text(json.dumps(config))
    return target


def _assert_same_module(one, two) -> None:
    a, b = load_module(one), load_module(two)
    assert a.tensors.keys() == b.tensors.keys()
    for stem in a.tensors:
        assert a.tensors[stem].keys() == b.tensors[stem].keys(), stem
        for name, x in a.tensors[stem].items():
            y = b.tensors[stem][name]
            if not x.is_floating_point():  # LT-SFT's selected indices: the same mask, exactly
                assert torch.equal(x, y), f"{stem}/{name} differs"
                continue
            # relative L2 per tensor (the measure the issue reported: 0.38 on v0.1). A max-abs bound
            # catches float noise: summing a batch in two halves reorders float additions, and Adam's
            # division by sqrt(v) magnifies those differences at entries whose gradients are tiny.
            rel = float((x - y).double().norm() / max(float(y.double().norm()), 1e-12))
            assert rel <= 1e-5, f"{stem}/{name}: relative L2 {rel:.3g}, max |diff| {float((x - y).abs().max()):.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("method", cli_methods())
def test_two_ranks_equal_one_process_language(workdir, nodrop_base, sw_corpus, method):
    """Same global batch (8 rows as 2 micro-batches of 4), dropout off: 2 ranks == 1 process to 1e-5.

    The torchrun run is also the end-to-end check of rank-0-only tracking and publishing.
    """
    args = ["train-lang", "--lang", "sw", "--method", method, "--base", str(nodrop_base), "--corpus", str(sw_corpus),
            "--max-steps", "8", "--batch-size", "4", "--set", "max_seq_len=32", "--set", "grad_accum=2",
            "--set", "lr=3e-3", *SMALL.get(method, []), *cli_settings(method, nodrop_base)]
    proc = _xlpeft(workdir, 2, *args, "--output", "modules/two")
    # the corpus is tokenised once: one rank builds the store, the other waits for it and reads it
    assert (proc.stderr.count("token cache built"), proc.stderr.count("token cache hit")) == (1, 1), proc.stderr[-2000:]
    # one MLflow run, one registered version, one artifact: written by rank 0 only
    assert proc.stdout.count("registered as xlpeft-lang-sw-") == 1, proc.stdout
    client = tracking.client()
    runs = client.search_runs([client.get_experiment_by_name("xlpeft").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["world_size"] == "2"
    assert [v.version for v in tracking.list_versions(f"xlpeft-lang-sw-{method}")] == ["1"]
    assert load_module(workdir / "modules/two").manifest.training["world_size"] == 2
    one = _xlpeft(workdir, 1, *args, "--output", "modules/one")
    assert "token cache hit" in one.stderr and "token cache built" not in one.stderr
    _assert_same_module(workdir / "modules/one", workdir / "modules/two")


@pytest.mark.slow
def test_two_ranks_stream_equal_one_process(workdir, nodrop_base, sw_corpus):
    """A streamed corpus under torchrun: rank 0 reads and tokenises, every batch is broadcast."""
    args = ["train-lang", "--lang", "sw", "--base", str(nodrop_base), "--corpus", str(sw_corpus), "--max-steps", "6",
            "--batch-size", "4", "--set", "max_seq_len=32", "--set", "lr=3e-3", "--set", "corpus_mode=stream",
            "--set", "stream_buffer=8"]
    two = _xlpeft(workdir, 2, *args, "--output", "modules/two")
    assert two.stderr.count("stream: reading") == 1, "only rank 0 reads the corpus"
    _xlpeft(workdir, 1, *args, "--output", "modules/one")
    _assert_same_module(workdir / "modules/one", workdir / "modules/two")


@pytest.mark.slow
@pytest.mark.parametrize("method", cli_methods())
def test_two_ranks_equal_one_process_task(workdir, nodrop_base, ner_files, method):
    """Task modules too: sentences of different lengths give ranks different labelled counts."""
    args = ["train-task", "--task", "ner", "--lang", "en", "--method", method, "--base", str(nodrop_base),
            "--train-data", str(ner_files["train"]), "--eval-data", str(ner_files["eval"]), "--max-steps", "8",
            "--batch-size", "4", "--set", "lang_module=none", "--set", "head_dropout=0", "--set", "grad_accum=2",
            "--set", "lr=3e-3", *SMALL.get(method, []), *cli_settings(method, nodrop_base)]
    _xlpeft(workdir, 1, *args, "--output", "modules/one")
    _xlpeft(workdir, 2, *args, "--output", "modules/two")
    _assert_same_module(workdir / "modules/one", workdir / "modules/two")


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    ["selection=dynamic", "reselect_every=3", "accumulation_steps=1"],
    ["selection=dynamic", "growth=sm3", "reselect_every=3", "accumulation_steps=1"],
    ["selection=fisher", "fisher_samples=16"],
], ids=["dynamic-rigl", "dynamic-sm3", "fisher"])
def test_two_ranks_keep_one_mask(workdir, nodrop_base, sw_corpus, settings):
    """Ranks see different rows, so their gradients differ; the mask must not: dynamic reselections take
    rank 0's growth and FISH sums every rank's Fisher scores. The loop compares the ranks' masks after
    each phase and fails the run if they differ, so a finished 2-rank run is the check."""
    sets = [x for setting in ["num_params=1500", *settings] for x in ("--set", setting)]
    args = ["train-lang", "--lang", "sw", "--method", "sft", "--base", str(nodrop_base), "--corpus", str(sw_corpus),
            "--max-steps", "8", "--batch-size", "4", "--set", "max_seq_len=32", "--set", "lr=3e-3", *sets]
    _xlpeft(workdir, 2, *args, "--output", "modules/two")
    module = load_module(workdir / "modules/two")
    assert module.manifest.trainable_parameters == 1500
    runs = tracking.client().search_runs([tracking.client().get_experiment_by_name("xlpeft").experiment_id])
    if "selection=dynamic" in settings:  # reselections after steps 1, 4 and 7 really happened
        assert runs[0].data.metrics["reselections"] == 3 and runs[0].data.metrics["replaced_entries"] > 0


def test_odd_batch_is_refused_with_a_fix():
    from xlpeft.distributed import Dist
    from xlpeft.errors import XlpeftError

    with pytest.raises(XlpeftError, match="multiple of 2"):
        Dist(rank=0, world=2).shard(torch.zeros(3, 4))
    assert Dist(rank=1, world=2).shard(torch.arange(4)).tolist() == [1, 3]


def test_rank_losses_sum_to_the_single_process_loss(base):
    """The per-rank normalisation itself: shard losses divided by the global count sum to the full-batch mean."""
    from xlpeft.data.mlm import mask_tokens, pack_blocks
    from xlpeft.distributed import Dist
    from xlpeft.training import mlm_loss

    ids = pack_blocks(base.tokenizer, ["watu wote wamezaliwa huru hadhi na haki"] * 40, 16, progress=False)[:4]
    inputs, labels = mask_tokens(ids, base.tokenizer, 0.3, torch.Generator().manual_seed(0))
    base.model.eval()
    with torch.no_grad():
        full = mlm_loss(base, inputs, labels)
        n = int((labels != -100).sum())
        parts = [mlm_loss(base, Dist(r, 2).shard(inputs), Dist(r, 2).shard(labels), num_labelled=n) for r in (0, 1)]
        means = [mlm_loss(base, Dist(r, 2).shard(inputs), Dist(r, 2).shard(labels)) for r in (0, 1)]
    assert torch.allclose(sum(parts), full, atol=1e-6)
    counts = [int((Dist(r, 2).shard(labels) != -100).sum()) for r in (0, 1)]
    if counts[0] != counts[1]:  # the old mean of per-rank means is then a different number
        assert not torch.allclose(sum(means) / 2, full, atol=1e-6)


def test_each_rank_has_its_own_dropout_stream():
    from xlpeft.distributed import Dist

    draws = {}
    for rank in (0, 1, 2):
        torch.manual_seed(42)
        Dist(rank, 3).seed_dropout(42)
        draws[rank] = torch.rand(4)
    torch.manual_seed(42)
    assert torch.equal(draws[0], torch.rand(4))  # rank 0 is the single process
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])
    torch.manual_seed(0)
    Dist(1, 3).seed_dropout(42, step=100)  # after a resume: distinct from the start-of-run stream
    assert not torch.equal(torch.rand(4), draws[1])


@pytest.mark.slow
@pytest.mark.exhaustive  # ~2 min a row on 2 cores: make test-all
@pytest.mark.parametrize("lang_method", ["adapter", "sft"])  # swapped by gates; applied and reverted in the weights
def test_two_ranks_equal_one_process_multi_source(workdir, nodrop_base, tmp_path, lang_method):
    """Multi-source task training (issue 22): each step's source is drawn from the shared seeded stream, so every
    rank swaps in the same language module for the same step, and 2 ranks train what 1 process trains."""
    from tests.conftest import EN_WORDS, SW_WORDS, make_lines, make_ner, write_conll

    sets = ["--set", "max_seq_len=32", "--set", "lr=3e-3"] + (["--set", "num_params=1500"] if lang_method == "sft" else [])
    langs = []
    for lang, words in (("en", EN_WORDS), ("sw", SW_WORDS)):
        corpus = tmp_path / f"{lang}.txt"
        corpus.write_text("\n".join(make_lines(words, 80)), encoding="utf-8")
        _xlpeft(workdir, 1, "train-lang", "--lang", lang, "--method", lang_method, "--base", str(nodrop_base),
                "--corpus", str(corpus), "--max-steps", "3", *sets, "--output", f"modules/lang-{lang}")
        langs.append(str(workdir / f"modules/lang-{lang}"))
    data = [str(write_conll(tmp_path / f"{lang}.conll", make_ner(32, seed=i))) for i, lang in enumerate(("en", "sw"))]
    args = ["train-task", "--task", "ner", "--lang", "en,sw", "--base", str(nodrop_base), "--train-data", ",".join(data),
            "--max-steps", "8", "--batch-size", "4", "--set", "grad_accum=2", "--set", "head_dropout=0",
            "--set", "lr=3e-3", "--set", "max_seq_len=32", "--set", "lang_module=" + ",".join(langs),
            "--set", "sampling=uniform"]
    _xlpeft(workdir, 1, *args, "--output", "modules/one")
    _xlpeft(workdir, 2, *args, "--output", "modules/two")
    _assert_same_module(workdir / "modules/one", workdir / "modules/two")
