"""Mining, second fidelity pass: the reference loaders' windows (token-exact against an
independent implementation of their rules), parse errors that cost only the candidates they
touch, and quotas that fill over several passes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tree_sitter as ts
import tree_sitter_java as tsj

from apmae_gpu.core.config import (
    CaptureConfig,
    InterveneConfig,
    MineConfig,
    load_config,
    mine_supply,
)
from apmae_gpu.mining.prompts import PromptBuilder, Skip
from apmae_gpu.mining.tasks import mine
from tests.java_fixtures import java_source, write_java_tree

W = 256


@pytest.fixture(scope="module")
def fim_tok(fim_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fim_tokenizer_dir)


def reference_window(tok, left: str, right: str, rule: str, w: int = W):
    """The reference loaders' rules, written from their description: tokenize
    ``left<fim_suffix>right`` as one string, find ``<fim_suffix>`` and cut.  The reference's
    head case writes ``<fim_prefix>`` twice (``[1, 1] + ids[:w-3] + [2]``); the fixed form
    writes it once.  None: the loader drops the prompt."""
    pre, suf, mid = (tok.convert_tokens_to_ids(t) for t in ("<fim_prefix>", "<fim_suffix>",
                                                            "<fim_middle>"))
    ids = tok(left + "<fim_suffix>" + right, add_special_tokens=False)["input_ids"]
    if len(ids) + 2 < w:
        return None                                   # shorter than the window: dropped
    at = ids.index(suf)
    if at <= w // 2:
        return [pre] + ids[:w - 2] + [mid]
    if rule == "train":                               # the training loader
        right_ids = ids[at:at + (w - 2) // 2]         # <fim_suffix> + up to 126 right tokens
        left_ids = ids[at - (w - 2 - len(right_ids)):at]
        return [pre] + left_ids + right_ids + [mid]
    window = ids[at - (w - 2) // 2:at + (w - 2) // 2]  # the analysis loader: 127 / 127
    return [pre] + window + [mid] if len(window) == w - 2 else None


def _holes(tok, text: str, step: int):
    """Every ``step``-th token of the file as a hole (character offsets), so holes fall at
    every distance from the start and the end (head, middle and tail cases)."""
    offs = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [(a, b) for a, b in offs[::step] if text[a:b].strip()] + \
        [(a, b) for a, b in offs[120:140] + offs[-140:-110] if text[a:b].strip()]


@pytest.mark.parametrize("rule", ["train", "analysis"])
def test_windows_are_token_exact_against_the_reference_rules(fim_tok, rule):
    text = java_source("Window", n_methods=3, seed=4)
    builder = PromptBuilder(fim_tok, W)
    names = set()
    holes = _holes(fim_tok, text, step=7)
    for cs, ce in holes:
        expect = reference_window(fim_tok, text[:cs], text[ce:], rule)
        try:
            got = builder.build(text, cs, ce, rule=rule)
        except Skip as why:
            assert expect is None, (cs, str(why))
            assert str(why) == ("short_right" if rule == "analysis" else "too_short")
            names.add(str(why))
            continue
        assert got["input_ids"] == expect, (cs, got["window_rule"])
        assert got["n_left"] + got["n_right"] == W - 3
        names.add(got["window_rule"])
        if got["window_rule"] == "centre":
            assert (got["n_left"], got["n_right"]) == (127, 126)
        if got["window_rule"] == "tail":
            assert got["n_right"] <= 126
    want = {"head", "tail"} if rule == "train" else {"head", "centre", "short_right"}
    assert want <= names, names


def test_exactly_fitting_file_is_whole_under_both_rules(fim_tok):
    text = java_source("Fit", n_methods=3)
    ids = fim_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    hole = text.index("total")
    builder = PromptBuilder(fim_tok, W)
    # Cut the file's end until left + right is exactly the 253 tokens a window holds.
    end = ids["offset_mapping"][260][1]
    while end > hole:
        left, right = text[:hole], text[hole + 5:end]
        n = len(fim_tok(left + "<fim_suffix>" + right, add_special_tokens=False)["input_ids"])
        if n == W - 2:
            break
        end -= 1
    assert n == W - 2
    for rule in ("train", "analysis"):
        got = builder.build(text[:end], hole, hole + 5, rule=rule)
        assert got["window_rule"] == "whole"
        assert got["input_ids"] == reference_window(fim_tok, left, right, rule)


def test_the_reference_head_case_repeats_fim_prefix_and_ours_does_not(fim_tok):
    text = java_source("Head", n_methods=3)
    hole = text.index("compute")
    got = PromptBuilder(fim_tok, W).build(text, hole, hole + 7, rule="analysis")
    pre = fim_tok.convert_tokens_to_ids("<fim_prefix>")
    assert got["window_rule"] == "head" and got["input_ids"].count(pre) == 1
    assert got["input_ids"][1] != pre


def _error_spans(data: bytes) -> list[tuple[int, int]]:
    tree = ts.Parser(ts.Language(tsj.language())).parse(data)
    out, stack = [], [tree.root_node]
    while stack:                                   # every node, independently of the code
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            out.append((node.start_byte, node.end_byte))
        stack.extend(node.children)
    return out


def test_parse_errors_drop_only_the_candidates_they_touch(tmp_path):
    good = java_source("Broken", n_methods=4)
    broken = good.replace("        total -= b / 2;\n", "        total -= b / ) 2 (;\n", 1)
    (tmp_path / "java").mkdir()
    (tmp_path / "java" / "Broken.java").write_text(broken)
    data = broken.encode()
    errors = _error_spans(data)
    assert errors
    df = mine(tmp_path / "run", corpus=str(tmp_path / "java"), model="smollm2",
              tasks="mathematical_operators,closing_brackets,end_of_line,random_masking",
              per_task=200, per_file=200, seed=1, train_per_task=0, max_passes=1)
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())["mine"]
    assert man["skipped"]["unparsable"] == 1 and man["skipped"]["parse_error"] >= 1
    syntax = df[df.task != "random_masking"]
    assert len(syntax) > 20 and set(syntax.task) == {"mathematical_operators",
                                                     "closing_brackets", "end_of_line"}
    for row in syntax.itertuples():
        assert not any(s <= row.end_byte and row.start_byte <= e for s, e in errors), row
    assert (df.task == "random_masking").sum() > 0       # random spans need no parse
    # the error's own operator is not a target, but the file's other ones are
    cut = broken.index("b / ) 2")
    assert not ((syntax.start_byte >= cut - 2) & (syntax.start_byte <= cut + 10)).any()


def _buildable_literals(files: dict[str, bytes], tok) -> int:
    """``true``/``false`` nodes of the files whose left prompt fits (independent count)."""
    parser = ts.Parser(ts.Language(tsj.language()))
    builder, n = PromptBuilder(tok, W), 0
    for data in files.values():
        stack = [parser.parse(data).root_node]
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.type in ("true", "false"):
                try:
                    builder.build(data.decode(), node.start_byte, node.end_byte)
                    n += 1
                except Skip:
                    pass
    return n


def test_quotas_fill_over_passes_without_repeating_a_hole(tmp_path, caplog, smol_tokenizer):
    files = write_java_tree(tmp_path / "java", n_files=3)
    df = mine(tmp_path / "run", corpus=str(tmp_path / "java"), model="smollm2",
              tasks="end_of_line,boolean_literals,random_masking", per_task=15, per_file=1,
              seed=2, train_per_task=0)
    counts = df.task.value_counts().to_dict()
    # one pass gives at most one hole per file and task: 3; the quotas need 15
    assert counts == {"end_of_line": 15, "boolean_literals": 15, "random_masking": 15}
    assert not df.duplicated(["task", "source", "start_byte", "end_byte"]).any()
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())["mine"]
    assert man["passes"] == 5 and man["missing"] == {}
    # A quota the corpus cannot fill: every hole once, then one line per short task.
    caplog.set_level(logging.WARNING, logger="apmae_gpu.mining.tasks")
    df = mine(tmp_path / "run2", corpus=str(tmp_path / "java"), model="smollm2",
              tasks="boolean_literals,assignment_operators", per_task=500, per_file=4, seed=2,
              train_per_task=0)
    assert not df.duplicated(["task", "source", "start_byte", "end_byte"]).any()
    lines = [r.getMessage() for r in caplog.records if "corpus exhausted" in r.getMessage()]
    assert len(lines) == 2 and all("of 500 rows" in x for x in lines)
    n_bool = (df.task == "boolean_literals").sum()
    # every boolean literal of the three files with a full window, once
    assert n_bool == _buildable_literals(files, smol_tokenizer) > 15
    assert any(f"boolean_literals (analysis): {n_bool} of 500" in x for x in lines)


def test_supply_derives_from_capture_and_intervene_quotas():
    cfg = MineConfig()
    per_task, noise = mine_supply(cfg)
    n, k = CaptureConfig().analysis.per_task, InterveneConfig().per_group
    assert per_task == int(np.ceil((n + k) / cfg.rarer_share)) == 75_000 and noise == 2 * n
    assert mine_supply(MineConfig(per_task=7)) == (7, 7)


@pytest.mark.parametrize("size", ["3b", "7b", "15b"])
def test_starcoder2_configs_supply_fills_every_tasks_quotas(size):
    """Simulate capture and intervention drawing from the configured supply: candidates are
    correct with the task's accuracy; a task right 85-90% of the time must still yield its
    5,000 + 1,000 incorrect ones.  The former fixed 40,000 is the negative control."""
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs"
                      / f"starcoder2-{size}.yaml")
    per_task, _ = mine_supply(cfg.mine, cfg.capture, cfg.intervene)
    need = cfg.capture.analysis.per_task + cfg.intervene.per_group
    rng = np.random.default_rng(0)

    def fills(supply: int, accuracy: float) -> bool:
        correct = rng.random((200, supply)) < accuracy
        return bool((np.minimum(correct.sum(1), supply - correct.sum(1)) >= need).all())

    for accuracy in (0.5, 0.7, 0.85, 0.9):
        assert fills(per_task, accuracy), accuracy
    assert not fills(40_000, 0.9)
