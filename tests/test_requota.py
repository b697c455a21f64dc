"""Issue 22: raising a split's quota captures the missing maps, so the run ends as if it had
been captured at the new quota from the start; a kill anywhere on the way and a rerun end
the same; lowering a quota is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from apmae_gpu.capture import requota
from apmae_gpu.capture.maps import capture
from apmae_gpu.core.check import check_run
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.store import MapStore
from apmae_gpu.synthetic import synthetic_tasks

MODEL = "random:tiny-llama"
KW = {"batch_size": 2, "device": "cpu"}


def _tasks(path):
    return synthetic_tasks(path, MODEL, n_per_task=8, window=16,
                           tasks=("identifiers", "noise", "random_masking"))


def _snapshot(run):
    store = MapStore(run)
    return store.inferences(), store.index(), store.read(np.arange(store.n_maps))


def _assert_same(a, b):
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])
    assert np.array_equal(a[2], b[2])


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The reference: train at quota 1, then analysis at quota 3 from the start."""
    ref = _tasks(tmp_path_factory.mktemp("fresh") / "run")
    capture(ref, MODEL, split="train", per_task=1, **KW)
    capture(ref, MODEL, split="analysis", per_task=3, **KW)
    return _snapshot(ref)


def _captured_at_1(path):
    run = _tasks(path)
    capture(run, MODEL, split="train", per_task=1, **KW)
    capture(run, MODEL, split="analysis", per_task=1, **KW)
    return run


def test_raising_a_quota_ends_as_a_capture_at_the_new_quota_from_the_start(tmp_path, fresh,
                                                                          monkeypatch):
    from apmae_gpu.capture import maps as capture_module

    run = _captured_at_1(tmp_path / "run")
    old = _snapshot(run)
    inf = old[0][old[0].split == "analysis"]
    # the case the issue is about: attempts judged at quota 1 and stored without maps
    assert (~inf.has_maps).any() and len(inf) < len(fresh[0][fresh[0].split == "analysis"])
    forwards = []
    real = capture_module.forward_with_maps
    monkeypatch.setattr(capture_module, "forward_with_maps",
                        lambda *a, **k: forwards.append(1) or real(*a, **k))
    summary = capture(run, MODEL, split="analysis", per_task=3, **KW)
    _assert_same(_snapshot(run), fresh)
    # the rounds the run held with every map the new quota keeps were copied, not prompted
    rounds = fresh[0][fresh[0].split == "analysis"].batch.nunique()
    assert 0 < len(forwards) < rounds
    kept = fresh[0][(fresh[0].split == "analysis") & fresh[0].has_maps]
    assert sum(t["kept"] for t in summary["tasks"].values()) == len(kept)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["identity"]["analysis"]["per_task"] == 3
    assert manifest["capture"]["splits"]["analysis"]["per_task"] == 3
    assert not list(run.glob("requota-*")) and not list(run.glob(".requota-*"))
    assert check_run(run, echo=lambda line: None) == []
    # the new quota resumes (adds nothing); a lower one is refused and changes nothing
    capture(run, MODEL, split="analysis", per_task=3, **KW)
    with pytest.raises(ApmaeError, match=r"the analysis split of .* was captured with "
                                         r"--per-task 3; this capture asks for 1"):
        capture(run, MODEL, split="analysis", per_task=1, **KW)
    _assert_same(_snapshot(run), fresh)


class _Killed(BaseException):
    pass


def test_a_raise_killed_mid_capture_or_mid_swap_reruns_to_the_same_run(tmp_path, fresh,
                                                                       monkeypatch):
    run = _captured_at_1(tmp_path / "run")
    commit, replace = MapStore.commit, requota.os.replace
    calls = {"commit": 0}

    def dying_commit(self, *args, **kwargs):
        calls["commit"] += 1
        if self.run.name == "requota-analysis" and calls["commit"] > 3:
            raise _Killed()
        return commit(self, *args, **kwargs)

    def dying_replace(src, dst):
        # the run's inferences moved out, the new ones not in yet
        if str(src) == str(run / "requota-analysis" / "inferences.parquet"):
            raise _Killed()
        return replace(src, dst)

    monkeypatch.setattr(MapStore, "commit", dying_commit)
    with pytest.raises(_Killed):
        capture(run, MODEL, split="analysis", per_task=3, **KW)
    monkeypatch.setattr(MapStore, "commit", commit)
    assert (run / "requota-analysis").is_dir()
    # meanwhile the run still holds the capture at quota 1
    assert json.loads((run / "manifest.json").read_text())["identity"]["analysis"] == {
        "heads": "all", "per_task": 1}
    monkeypatch.setattr(requota.os, "replace", dying_replace)
    with pytest.raises(_Killed):
        capture(run, MODEL, split="analysis", per_task=3, **KW)
    monkeypatch.setattr(requota.os, "replace", replace)
    assert not (run / "inferences.parquet").exists()
    capture(run, MODEL, split="analysis", per_task=3, **KW)
    _assert_same(_snapshot(run), fresh)
    assert check_run(run, echo=lambda line: None) == []


def test_a_raise_the_store_cannot_rebuild_exactly_is_one_line(tmp_path):
    run = _tasks(tmp_path / "run")
    capture(run, MODEL, split="analysis", per_task=1, **KW)
    capture(run, MODEL, split="train", per_task=1, **KW)
    before = _snapshot(run)
    with pytest.raises(ApmaeError, match=r"^raising --per-task of the analysis split of .* from "
                                         r"1 to 2 is not possible once another split was "
                                         r"captured after it \(capture the new quota into a "
                                         r"new run\)$"):
        capture(run, MODEL, split="analysis", per_task=2, **KW)
    _assert_same(_snapshot(run), before)


def test_the_pipeline_after_raising_the_analysis_quota_ends_as_a_fresh_run(tmp_path, fresh):
    from apmae_gpu.pipeline import run_pipeline

    run = _tasks(tmp_path / "run")
    config = tmp_path / "c.yaml"
    text = ("model: {m}\ndevice: cpu\nstages: [capture_train, capture_analysis]\n"
            "capture: {{batch_size: 2, train: {{per_task: 1, heads: layerwise:0.25}}, "
            "analysis: {{per_task: {q}}}}}\n")
    config.write_text(text.format(m=MODEL, q=1))
    run_pipeline(config, out=run)
    config.write_text(text.format(m=MODEL, q=3))
    summary = run_pipeline(config, out=run)
    assert not summary["stages"]["capture_analysis"].get("skipped")
    _assert_same(_snapshot(run), fresh)
    assert json.loads((run / "manifest.json").read_text())["identity"]["analysis"] == {
        "heads": "all", "per_task": 3}
