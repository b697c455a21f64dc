"""One source per setting: every stage option takes its default and bounds from its field in
apmae_gpu/core/config.py, and `--config` hands a command a pipeline config's section."""

from __future__ import annotations

import pytest
import typer.main
from typer.testing import CliRunner

from apmae_gpu import cli
from apmae_gpu.core.config import (CaptureConfig, CaptureSplitConfig, ClassifyConfig,  # noqa: I001
                                   ClusterConfig, EncodeConfig, EvaluateConfig, InterveneConfig,
                                   MineConfig, PipelineConfig, ReportConfig, StabilityConfig,
                                   TrainConfig, TrustConfig)

# command -> the config sections its options set (an option named like a field sets it)
COMMANDS = {
    "mine": [MineConfig], "capture": [CaptureConfig, CaptureSplitConfig],
    "train": [TrainConfig], "evaluate": [EvaluateConfig], "encode": [EncodeConfig],
    "cluster": [ClusterConfig], "classify": [ClassifyConfig], "intervene": [InterveneConfig],
    "report": [ReportConfig], "trust": [TrustConfig, ClusterConfig],
    "stability": [StabilityConfig, ClusterConfig],
}
RENAMED = {("classify", "early_stopping_rounds"): "--early-stopping"}
# settings only a config file holds (what the pipeline decides, or several values at once)
CONFIG_ONLY = {
    MineConfig: {"per_task_overrides"},
    CaptureConfig: {"encode_analysis", "nproc", "train", "analysis"},
    TrainConfig: {"nproc", "model_config_overrides"},   # --model-config FILE holds the latter
    EvaluateConfig: {"checkpoints", "data"},            # --checkpoint/--data take them all
    EncodeConfig: {"nproc"},
}
# options named like a config-only field that mean something else (--data: every run to
# evaluate; evaluate.data: more runs beside the pipeline's own)
OTHER_MEANING = {("evaluate", "data")}
# the capture split's settings: the default depends on --split, so the option's is None
PER_SPLIT = {"per_task", "heads", "max_attempts"}

COMMAND = typer.main.get_command(cli.app)


def _params(command: str) -> dict:
    return {p.name: p for p in COMMAND.commands[command].params}


def _expected_default(info):
    value = info.get_default(call_default_factory=True)
    return ",".join(map(str, value)) if isinstance(value, list) else value


def _bounds(info) -> tuple:
    lo = next((m.ge for m in info.metadata if getattr(m, "ge", None) is not None), None)
    hi = next((m.le for m in info.metadata if getattr(m, "le", None) is not None), None)
    return lo, hi


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_options_share_defaults_and_bounds_with_the_config(command):
    params = _params(command)
    checked = 0
    for model in COMMANDS[command]:
        for name, info in model.model_fields.items():
            if name in CONFIG_ONLY.get(model, set()):
                assert name not in params or (command, name) in OTHER_MEANING, \
                    f"{command} --{name} is said to be config-only"
                continue
            if model is ClusterConfig and command != "cluster" and (
                    name not in params or name in COMMANDS[command][0].model_fields):
                continue   # the studies take the UMAP/dask options, not HDBSCAN's
            param = params[name]
            if (command, name) in RENAMED:
                assert param.opts[0] == RENAMED[command, name]
            if model is CaptureSplitConfig and name in PER_SPLIT:
                assert param.default is None   # the split's default, from the config
            else:
                assert param.default == _expected_default(info), (command, name)
            lo, hi = _bounds(info)
            assert (param.min, param.max) == (lo, hi), \
                (command, name)
            checked += 1
    assert checked >= 1


def test_every_section_setting_has_an_option_or_is_config_only():
    commands_of = {}
    for command, models in COMMANDS.items():
        for model in models:
            commands_of.setdefault(model, []).append(command)
    for section in (MineConfig, CaptureConfig, TrainConfig, EvaluateConfig, EncodeConfig,
                    ClusterConfig, ClassifyConfig, InterveneConfig, ReportConfig, TrustConfig,
                    StabilityConfig):
        names = set()
        for command in commands_of[section]:
            names |= set(_params(command))
        missing = set(section.model_fields) - names - CONFIG_ONLY.get(section, set())
        assert not missing, (section.__name__, missing)


def test_config_defaults_are_the_papers():
    cfg = PipelineConfig()
    # the analysis supply is derived from capture's and intervene's quotas (mine_supply)
    assert (cfg.mine.per_task, cfg.mine.train_per_task) == (None, 800_000)
    assert (cfg.capture.train.per_task, cfg.capture.analysis.per_task) == (400_000, 5000)
    assert (cfg.train.preset, cfg.train.steps, cfg.train.batch_size) == ("paper", 150_000, 60)
    assert cfg.intervene.per_group == 1000
    assert cfg.intervene.k == [1, 2, 5, 10, 20, 50, 100, 200, 400, 600, 800]
    assert (cfg.cluster.umap_dims, cfg.cluster.neighbors, cfg.cluster.min_samples,
            cfg.cluster.min_cluster_size) == (8, 20, 20, 25)


@pytest.fixture
def seen(monkeypatch):
    """Stand in for the cluster stage: record what the command passes it."""
    from apmae_gpu.clustering import heads as clustering

    calls = []
    monkeypatch.setattr(clustering, "cluster", lambda run, settings, **kw: calls.append(
        (settings, kw)))
    return calls


def test_config_gives_the_section_and_options_override_it(tmp_path, seen):
    config = tmp_path / "c.yaml"
    config.write_text("seed: 7\ncluster: {neighbors: 5, min_samples: 3, workers: 2}\n")
    run = tmp_path / "run"   # does not exist: no lock to take
    r = CliRunner().invoke(cli.app, ["cluster", str(run), "--config", str(config),
                                     "--min-samples", "4"])
    assert r.exit_code == 0, r.output
    settings, kw = seen[0]
    assert (settings.neighbors, settings.min_samples, settings.workers) == (5, 4, 2)
    assert settings.min_cluster_size == ClusterConfig().min_cluster_size
    assert kw["seed"] == 7
    r = CliRunner().invoke(cli.app, ["cluster", str(run), "--config", str(config),
                                     "--seed", "1", "--metric", "euclidean"])
    assert r.exit_code == 0, r.output
    settings, kw = seen[1]
    assert (settings.neighbors, settings.metric, kw["seed"]) == (5, "euclidean", 1)


def test_without_config_the_options_defaults_are_the_sections(tmp_path, seen):
    r = CliRunner().invoke(cli.app, ["cluster", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert seen[0][0] == ClusterConfig()


def test_open_bounds_and_choices_are_checked_by_the_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["classify", str(tmp_path), "--eval-fraction", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --eval-fraction: input should be less than 1 (got 1.0)"
    with pytest.raises(SystemExit):
        cli.main(["intervene", str(tmp_path), "--groups", "positive,bogus"])
    assert capsys.readouterr().err.strip().startswith("error: --groups: input should be "
                                                      "'positive', 'negative'")
    with pytest.raises(SystemExit):
        cli.main(["intervene", str(tmp_path), "--k", "1,0"])
    assert capsys.readouterr().err.strip() == ("error: --k: input should be greater than or "
                                              "equal to 1 (got '0')")


def test_stage_functions_take_their_section_or_keywords(tmp_path):
    from apmae_gpu.clustering import heads as clustering
    from apmae_gpu.core.errors import ApmaeError
    from apmae_gpu.encoding import encoder as encoding

    with pytest.raises(ApmaeError, match="^cluster: unknown key 'neighbours'$"):
        clustering.cluster(tmp_path, neighbours=5)
    with pytest.raises(ApmaeError, match=r"^cluster: neighbors: input should be greater than or "
                                         r"equal to 2 \(got 1\)$"):
        clustering.cluster(tmp_path, ClusterConfig(), neighbors=1)
    with pytest.raises(TypeError, match=r"encode settings: expected an instance of EncodeConfig, "
                                        r"got PosixPath \(pass the other arguments by keyword\)"):
        encoding.encode(tmp_path, tmp_path / "checkpoint")


def test_run_wide_options_default_to_the_pipeline_configs():
    top = PipelineConfig()
    for command in COMMANDS:
        params = _params(command)
        if "seed" in params:
            assert params["seed"].default == top.seed, command
        if "device" in params:
            assert params["device"].default == top.device, command
        if "trust_remote_code" in params:
            assert params["trust_remote_code"].default is top.trust_remote_code, command
    assert "seed" in _params("cluster") and "device" in _params("capture")


def test_choices_the_stages_map_are_the_configs():
    import typing

    from apmae_gpu.intervention.groups import RANKINGS

    assert typing.get_args(InterveneConfig.model_fields["rank_by"].annotation) == tuple(RANKINGS)


def test_corpus_jdk_is_resolved_by_the_stage(monkeypatch):
    from apmae_gpu.core.errors import ApmaeError
    from apmae_gpu.mining import corpus

    assert corpus.resolve_corpus("some/dir") == "some/dir"
    monkeypatch.setattr(corpus, "default_jdk_src", lambda: "/x/src.zip")
    assert corpus.resolve_corpus("jdk") == "/x/src.zip"
    monkeypatch.setattr(corpus, "default_jdk_src", lambda: None)
    with pytest.raises(ApmaeError, match="corpus `jdk` needs the JDK sources"):
        corpus.resolve_corpus("jdk")


def test_every_setting_option_takes_its_help_from_its_config_field():
    """One source per setting's text: no option built from a config field writes its own help
    (apart from --config and options that are not settings), and every such field has a
    description, which `--help` shows."""
    import ast
    from pathlib import Path

    from typer.testing import CliRunner

    import apmae_gpu.core.config as C
    from apmae_gpu.cli import app
    from apmae_gpu.cli_options import describe_field

    tree = ast.parse((Path(__file__).resolve().parents[1] / "apmae_gpu" / "cli.py").read_text())
    calls = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and \
                n.func.id in ("opt", "_cluster_opt"):
            args = n.args if n.func.id == "opt" else [ast.Name("ClusterConfig"), *n.args]
            if isinstance(args[1], ast.Constant):
                calls.append((args[0].id, args[1].value, [k.arg for k in n.keywords]))
    assert len(calls) > 100
    assert [c for c in calls if "help" in c[2]] == []
    assert [c for c in calls if not getattr(C, c[0]).model_fields[c[1]].description] == []
    text = describe_field(C.MineConfig.model_fields["per_file"])
    out = CliRunner().invoke(app, ["mine", "--help"], env={"COLUMNS": "400"}).output
    assert text.split("(")[0].strip() in " ".join(out.split())
