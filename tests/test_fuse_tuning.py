"""mtkernels.fuse.tuning: batch buckets, the on-disk decision cache, MTKERNELS_TUNE=off and
retime."""

import json
import multiprocessing
import os
import subprocess
import sys
import warnings

import pytest
import torch

import models
import mtkernels
from mtkernels.fuse import tuning

FIRST_CALLS = """
import json, torch, models, mtkernels
torch.manual_seed(0)
model = models.build_model("bknet").eval()
fast = mtkernels.fuse_for_inference(model)
with torch.no_grad():
    for n in (1, 5):
        x = torch.randn(n, 1, 48, 48, generator=torch.Generator().manual_seed(n))
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
print(json.dumps({"timed": mtkernels.fuse.tuning_cache().timed}))
"""


def run_first_calls(cache_dir, **env) -> int:
    result = subprocess.run([sys.executable, "-c", FIRST_CALLS], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "MTKERNELS_CACHE_DIR": str(cache_dir), **env}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["timed"]


def test_a_second_process_reuses_the_first_ones_tuning(tmp_path):
    assert run_first_calls(tmp_path) > 0
    files = list(tmp_path.glob("tuning-*.json"))
    assert len(files) == 1
    decisions = json.loads(files[0].read_text())["decisions"]
    assert any(key.startswith("net:") for key in decisions) and any(key.startswith("conv:") for key in decisions)
    assert run_first_calls(tmp_path) == 0


def test_tuning_off_times_nothing(tmp_path):
    assert run_first_calls(tmp_path, MTKERNELS_TUNE="off") == 0
    assert not list(tmp_path.glob("tuning-*.json"))


def test_a_bad_tune_setting_is_named(monkeypatch):
    monkeypatch.setenv("MTKERNELS_TUNE", "sometimes")
    with pytest.raises(ValueError, match="MTKERNELS_TUNE must be 'on', 'off' or 'retime', got 'sometimes'"):
        tuning.tuning_enabled()


def test_retime_times_each_stored_decision_again_once_per_process(tmp_path, monkeypatch):
    """A decision stored by an earlier (busy) process is timed again, once, and replaced;
    later calls in the same process reuse the new one."""
    monkeypatch.setattr(tuning, "_CACHE", tuning.TuningCache(tmp_path))
    tuning.tuning_cache().store("conv:a", "slow among slow,fast")
    times = []

    def fastest(candidates, x, **kw):
        times.append(sorted(candidates))
        return "fast"

    monkeypatch.setattr(tuning, "fastest", fastest)
    x = torch.zeros(1)
    assert tuning.choose("conv:a", ["slow", "fast"], lambda name: None, x, "slow") == "slow"  # "on": stored
    monkeypatch.setenv("MTKERNELS_TUNE", "retime")
    for _ in range(3):
        assert tuning.choose("conv:a", ["slow", "fast"], lambda name: None, x, "slow") == "fast"
    assert times == [["fast", "slow"]]
    assert tuning.TuningCache(tmp_path).lookup("conv:a") == "fast among slow,fast"  # on disk for later processes


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "decisions": []}),
                                     json.dumps({"format": 1, "context": {"cpu": "another"}, "decisions": {}}),
                                     json.dumps([1, 2])],
                         ids=["truncated", "wrong-shape", "foreign-context", "not-an-object"])
def test_a_corrupt_or_foreign_file_is_ignored_with_one_warning_and_rewritten(tmp_path, content):
    cache = tuning.TuningCache(tmp_path)
    path, context = cache.path()
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match="ignoring the corrupt or foreign tuning cache"):
        assert cache.lookup("conv:a") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.lookup("conv:b") is None  # one warning per file
        cache.store("conv:a", "onednn")
    data = json.loads(path.read_text())
    assert data == {"format": tuning.FILE_FORMAT, "context": context, "decisions": {"conv:a": "onednn"}}
    assert tuning.TuningCache(tmp_path).lookup("conv:a") == "onednn"


def _store_many(directory, prefix, count):
    cache = tuning.TuningCache(directory)
    for k in range(count):
        cache.store(f"{prefix}:{k}", "aten")


def test_concurrent_processes_merge_their_decisions(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_store_many, args=(tmp_path, f"p{w}", 25)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    decisions = tuning.TuningCache(tmp_path)
    assert all(decisions.lookup(f"p{w}:{k}") == "aten" for w in range(3) for k in range(25))
    assert not list(tmp_path.glob("*.tmp"))


def test_an_unwritable_directory_keeps_decisions_in_memory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = tuning.TuningCache(blocker / "sub")
    with pytest.warns(RuntimeWarning, match="cannot write the tuning cache"):
        cache.store("conv:a", "aten")
    assert cache.lookup("conv:a") == "aten"


def test_the_context_names_what_a_decision_depends_on():
    context = tuning.machine_context()
    assert set(context) == {"format", "cpu", "isa", "threads", "torch", "mtkernels"}
    assert context["isa"] == mtkernels._C.isa() and context["threads"] == torch.get_num_threads()


@pytest.mark.parametrize("n,bucket", [(1, "1"), (2, "2-3"), (3, "2-3"), (4, "4-15"), (15, "4-15"), (16, "16-63"),
                                      (63, "16-63"), (64, "64+"), (10_000, "64+")])
def test_batch_buckets(n, bucket):
    assert tuning.batch_bucket(n) == bucket


def test_batch_bucket_of_an_empty_batch_is_refused():
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        tuning.batch_bucket(0)


def test_fastest_picks_the_fast_candidate_and_drops_slow_ones():
    calls = {"fast": 0, "slow": 0}

    def fast(x):
        calls["fast"] += 1
        return x

    def slow(x):
        calls["slow"] += 1
        torch.mm(torch.ones(400, 400), torch.ones(400, 400))
        return x

    # min_seconds tiny: every timing is one call, so the calls count the rounds
    assert tuning.fastest({"slow": slow, "fast": fast}, torch.zeros(1), min_seconds=1e-9) == "fast"
    assert calls["slow"] == 4 and calls["fast"] == 4  # two untimed calls, two timed rounds, then dropped


def test_models_fuse_through_their_own_hook():
    model = models.build_model("emotion-cnn").eval()
    fused = mtkernels.fuse_for_inference(model)
    assert isinstance(fused, mtkernels.fuse.FusedMultiTaskNet)
    assert fused.num_classes == model.num_classes and fused.task_names == model.task_names


def test_a_new_candidate_is_timed_not_shadowed_by_an_old_decision(tmp_path, monkeypatch):
    cache = tuning.TuningCache(tmp_path)
    monkeypatch.setattr(tuning, "_CACHE", cache)
    ran = []

    def build(name):
        return lambda x: ran.append(name)
    x = torch.zeros(1)
    first = tuning.choose("conv:k", ["a", "b"], build, x, heuristic="a")
    assert tuning.choose("conv:k", ["a", "b"], build, x, heuristic="a") == first and cache.timed == 1
    ran.clear()
    tuning.choose("conv:k", ["a", "b", "c"], build, x, heuristic="a")
    assert cache.timed == 2 and "c" in ran
