"""torchrun data parallelism on CPU (gloo): one MLflow run, one artifact, written by rank 0."""

import os
import subprocess
import sys

import pytest

from xlpeft import load_module, tracking


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("adapter", []), ("sft", ["--set", "num_params=1500"])])
def test_torchrun_two_processes(workdir, base_dirs, sw_corpus, method, extra):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "XLPEFT_CACHE": str(workdir / "cache"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "xlpeft",
           "train-lang", "--lang", "sw", "--method", method, "--base", str(base_dirs["tiny-bert"]), "--corpus",
           str(sw_corpus), "--max-steps", "6", "--batch-size", "4", "--set", "max_seq_len=32", *extra]
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("registered as xlpeft-lang-sw-") == 1, proc.stdout
    client = tracking.client()
    runs = client.search_runs([client.get_experiment_by_name("xlpeft").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["world_size"] == "2"
    assert [v.version for v in tracking.list_versions(f"xlpeft-lang-sw-{method}")] == ["1"]
    module = load_module(workdir / f"modules/lang-sw-{method}")
    assert module.manifest.training["world_size"] == 2


def test_odd_batch_is_refused_with_a_fix():
    import torch

    from xlpeft.distributed import Dist
    from xlpeft.errors import XlpeftError

    with pytest.raises(XlpeftError, match="multiple of 2"):
        Dist(rank=0, world=2).shard(torch.zeros(3, 4))
    assert Dist(rank=1, world=2).shard(torch.arange(4)).tolist() == [1, 3]
