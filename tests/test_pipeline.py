"""Pipeline configs are validated with one-line errors; a finished run's rerun skips every
complete stage; changing one stage's settings reruns that stage and the ones after it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from apmae_gpu.cli import main
from apmae_gpu.core.config import STAGES, load_config
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.pipeline import run_pipeline, stage_keys, stage_order

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["demo", "starcoder2-3b", "starcoder2-7b", "starcoder2-15b"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    if name == "demo":
        assert cfg.model == "smollm2" and cfg.mine.corpus == "jdk" and cfg.train.preset == "tiny"
        assert set(cfg.stages) == set(STAGES)
    else:
        size = name.split("-")[1]
        assert cfg.model == f"bigcode/starcoder2-{size}" and cfg.train.preset == "paper"
        assert cfg.cluster.backend == "cuml" and cfg.train.nproc == 8
        assert cfg.mine.corpus == "hf:LaughingLogits/Stackless_Java_V2?split=test"
        assert cfg.mine.train_corpus == "hf:LaughingLogits/Stackless_Java_V2?split=train"
        # 25% of the heads over ~72M maps, as the paper trained
        heads = {"3b": 720, "7b": 1152, "15b": 1920}[size]
        assert 60e6 < cfg.capture.train.per_task * heads * 0.25 < 80e6
        assert stage_order(cfg).index("capture_analysis") > stage_order(cfg).index("train")
        assert "encode" not in stage_order(cfg)


def test_study_config_is_sized_by_its_power_calculation():
    from apmae_gpu.report import findings_stats as S

    cfg = load_config(CONFIGS / "study.yaml")
    assert cfg.model == "smollm2" and cfg.mine.corpus == "jdk"
    assert cfg.capture.encode_analysis and "encode" not in stage_order(cfg)
    assert (cfg.classify.folds, cfg.classify.one_hot_max_size, cfg.classify.boosting_type) == \
        (10, 16, "Plain")
    assert cfg.classify.stability_refits >= 50
    tasks = cfg.mine.tasks.split(",")
    assert sorted(tasks) == sorted(["identifiers", "boolean_literals", "string_literals",
                                    "end_of_line", "random_masking"])
    a = cfg.capture.analysis
    # every labelled attempt kept: no class can fill its quota within max_attempts
    assert a.per_task >= a.max_attempts
    n = a.max_attempts
    # claim 4 (simulated Fisher, Holm's first step over 5 tasks): >= 80% at balanced accuracy
    # 0.58 for SmolLM2's 38-78% correct; pooled (CMH) >= 80% at 0.53
    priors = [0.38, 0.45, 0.48, 0.78]
    assert min(S.power_ba(n, p, 0.58, 0.05, len(tasks), 2000) for p in priors) >= 0.8
    assert S.power_cmh(n, [0.48, 0.45, 0.38, 0.78, 0.39], 0.53, 0.05, 2000) >= 0.8
    # 5 x max_attempts forwards (no noise: mine.tasks names the tasks) at 1.36 attempts/s
    assert "noise" not in tasks and len(tasks) * a.max_attempts / 1.36 <= 40 * 60
    assert cfg.mine.train_per_task >= cfg.capture.train.max_attempts
    # claims 6/7: pre-registered k among those run; pooled pairs give >= 80% at +-10 points
    it = cfg.intervene.task.split(",")
    assert len(it) <= 2 and {cfg.intervene.few_heads_k, cfg.intervene.many_heads_k} <= \
        set(cfg.intervene.k)
    pairs = len(it) * 2 * cfg.intervene.per_group
    assert S.power_paired(pairs, 0.4, 0.10, 0.05, 1, 2000) >= 0.8
    # candidates: the analysis attempts and the held-out search (~700 on end of line)
    assert cfg.mine.per_task >= a.max_attempts + 700


@pytest.mark.parametrize("text,message", [
    ("capture:\n  batch_sise: 4\n", "unknown key 'capture.batch_sise'"),
    ("train:\n  steps: many\n", "train.steps: input should be a valid integer"),
    ("cluster: {backend: tpu}\n", "cluster.backend"),
    ("stages: [mine, dance]\n", "stages.1"),
    ("mine: [1, 2\n", "not valid YAML"),
])
def test_bad_configs_are_one_line_errors(text, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ApmaeError, match=message.replace(".", r"\.").replace("[", r"\[")):
        load_config(path)
    with pytest.raises(SystemExit) as exc:
        main(["pipeline", "--config", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_base_files_are_merged(tmp_path):
    (tmp_path / "base.yaml").write_text("model: m1\ncluster: {workers: 4, neighbors: 7}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ncluster: {workers: 2}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.model == "m1" and cfg.cluster.workers == 2 and cfg.cluster.neighbors == 7
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ApmaeError, match="loops"):
        load_config(tmp_path / "loop.yaml")


def test_stage_keys_chain(tmp_path):
    a = load_config(CONFIGS / "demo.yaml")
    b = a.model_copy(deep=True)
    b.classify.iterations = 7
    ka, kb = stage_keys(a), stage_keys(b)
    order = stage_order(a)
    changed = [s for s in order if ka[s] != kb[s]]
    assert changed == order[order.index("classify"):]


def test_rerun_skips_complete_stages_and_reruns_changed_ones(e2e_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(e2e_run, run)
    state = json.loads((run / "pipeline.json").read_text())
    assert all(s["status"] == "done" for s in state["stages"].values())
    config = tmp_path / "tiny.yaml"
    from tests.conftest import E2E_CONFIG

    config.write_text(E2E_CONFIG)
    summary = run_pipeline(config, out=run)
    assert all(s.get("skipped") for s in summary["stages"].values()), summary["stages"]
    assert summary["headlines"]["heads clustered (ok / all)"] == "8 / 8"

    config.write_text(E2E_CONFIG.replace("intervene: {k: [1, 2, 4, 8], per_group: 2}",
                                         "intervene: {k: [1, 8], per_group: 2}"))
    summary = run_pipeline(config, out=run)
    ran = [s for s, v in summary["stages"].items() if not v.get("skipped")]
    assert ran == [s for s in ("intervene", "report") if s in summary["stages"]]
    import pandas as pd

    assert sorted(pd.read_parquet(run / "intervene" / "results.parquet").k.unique()) == [1, 8]


def test_headline_classifier_is_the_largest_gain_over_majority(tmp_path):
    import pandas as pd

    from apmae_gpu.pipeline import headlines

    (tmp_path / "classify").mkdir()
    rows = []
    for task, cb, maj in (("closing_brackets", 0.90, 0.90), ("identifiers", 0.70, 0.50),
                          ("end_of_line", 0.55, 0.50)):
        rows += [dict(task=task, method="catboost", accuracy_mean=cb, ci_low=cb - 0.1,
                      ci_high=cb + 0.1),
                 dict(task=task, method="majority", accuracy_mean=maj, ci_low=maj,
                      ci_high=maj)]
    pd.DataFrame(rows).to_parquet(tmp_path / "classify" / "metrics.parquet")
    out = headlines(tmp_path)
    # closing_brackets has the best accuracy but only matches its majority class
    assert out["best correctness classifier"] == "identifiers: 0.700 [0.600, 0.800]"
    assert out["  majority baseline there"] == 0.5
