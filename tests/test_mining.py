"""Mining: targets are of the right syntactic kind, never in comments or strings, prompts are
exactly `window` tokens in both layouts, the target token is the prompt's own, seeds
reproduce, and bad input is counted or refused with one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import tree_sitter as ts
import tree_sitter_java as tsj

from apmae_gpu import TASKS
from apmae_gpu.cli import main
from apmae_gpu.mining.tasks import (
    BOOLEAN_BINARY,
    COMPOUND_ASSIGNMENT,
    MATH_BINARY,
    JavaTargets,
    PromptBuilder,
    Skip,
    mine,
)
from tests.java_fixtures import java_source, write_java_tree

PARSER = ts.Parser(ts.Language(tsj.language()))
SYNTAX = TASKS[:9]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("java")
    files = write_java_tree(root, n_files=6)
    return root, files


@pytest.fixture(scope="module")
def mined_left(corpus, tmp_path_factory):
    root, _ = corpus
    out = tmp_path_factory.mktemp("run_left")
    return mine(out, corpus=str(root), model="smollm2", per_task=8, per_file=2, seed=3,
                train_per_task=0), out


@pytest.fixture(scope="module")
def mined_fim(corpus, tmp_path_factory, fim_tokenizer_dir):
    root, _ = corpus
    out = tmp_path_factory.mktemp("run_fim")
    return mine(out, corpus=str(root), model=str(fim_tokenizer_dir), per_task=8, per_file=2,
                seed=3, train_per_task=0), out


def _enclosing_types(tree, start, end):
    node = tree.root_node.descendant_for_byte_range(start, end)
    types = []
    while node is not None:
        types.append(node.type)
        node = node.parent
    return node, types


def _check_syntax(row, data: bytes):
    tree = PARSER.parse(data)
    end = row.start_byte + 1 if row.task == "end_of_line" else row.end_byte
    node = tree.root_node.descendant_for_byte_range(row.start_byte, end)
    assert (node.start_byte, node.end_byte) == (row.start_byte, end), row.task
    ancestors = []
    p = node.parent
    while p is not None:
        ancestors.append(p.type)
        p = p.parent
    assert "line_comment" not in ancestors and "block_comment" not in ancestors
    assert node.type not in ("line_comment", "block_comment", "string_fragment")
    if row.task != "string_literals":
        assert "string_literal" not in ancestors and "character_literal" not in ancestors
    t = row.task
    if t == "identifiers":
        assert node.type == "identifier"      # the reference: identifier nodes only
    elif t == "boolean_literals":
        assert node.type in ("true", "false")
    elif t == "string_literals":
        assert node.type in ("string_literal", "character_literal")
    elif t == "numeric_literals":
        assert node.type.endswith("_literal") and ("integer" in node.type or "floating" in node.type)
    elif t == "boolean_operators":
        assert row.target in BOOLEAN_BINARY | {"!"}
        assert node.parent.type in ("binary_expression", "unary_expression")
    elif t == "mathematical_operators":
        assert row.target in MATH_BINARY | {"++", "--"}
        assert node.parent.type in ("binary_expression", "unary_expression", "update_expression")
    elif t == "assignment_operators":
        assert row.target in COMPOUND_ASSIGNMENT and node.parent.type == "assignment_expression"
    elif t == "closing_brackets":
        assert row.target in ("}", ")", "]") and not node.is_named
    elif t == "end_of_line":
        # the hole is `;` with its line break, so the right context starts on the next line
        assert node.type == ";" and re.fullmatch(r";[ \t]*(\r\n|\n|\r)", row.target), row.target
        assert data[row.end_byte - 1:row.end_byte] in (b"\n", b"\r")


@pytest.mark.parametrize("which", ["mined_left", "mined_fim"])
def test_targets_are_exact_syntax_nodes(which, corpus, request):
    df, _ = request.getfixturevalue(which)
    _, files = corpus
    assert set(df.task) == set(TASKS)
    assert (df.groupby("task").size() == 8).all()
    for row in df[df.task.isin(SYNTAX)].itertuples():
        data = files[row.source]
        assert data[row.start_byte:row.end_byte].decode() == row.target
        _check_syntax(row, data)
    spans = df[df.task == "random_masking"]
    for row in spans.itertuples():
        assert files[row.source][row.start_byte:row.end_byte].decode() == row.target
        assert row.target and not row.target[0].isspace()


def test_left_prompts_match_the_files_own_tokenization(mined_left, corpus, smol_tokenizer):
    df, _ = mined_left
    _, files = corpus
    assert not df.fim.any()
    assert (df.input_ids.map(len) == 256).all()
    assert set(df.window_rule) == {"left", "noise"}
    for row in df[df.task != "noise"].itertuples():
        text = files[row.source].decode()
        enc = smol_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        cs = len(files[row.source][:row.start_byte].decode())
        t = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > cs)
        assert list(row.input_ids) == enc["input_ids"][t - 256:t]
        assert row.target_token_id == enc["input_ids"][t]
        assert row.target_token_ids[0] == row.target_token_id
        # The target token, decoded, is the target's start (possibly with leading space).
        assert smol_tokenizer.decode([row.target_token_id]).strip()[:1] == row.target.strip()[:1]


def test_fim_prompts_have_the_fim_layout(mined_fim, corpus, fim_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fim_tokenizer_dir)
    pre, suf, mid = (tok.convert_tokens_to_ids(t) for t in ("<fim_prefix>", "<fim_suffix>",
                                                            "<fim_middle>"))
    df, _ = mined_fim
    _, files = corpus
    rows = df[df.task != "noise"]
    assert rows.fim.all() and (df.input_ids.map(len) == 256).all()
    # analysis prompts: the reference analysis loader's centred window
    assert set(rows.window_rule) <= {"whole", "head", "centre"} and "centre" in set(rows.window_rule)
    for row in rows.itertuples():
        ids = list(row.input_ids)
        assert ids[0] == pre and ids[-1] == mid and ids.count(suf) == 1
        k = ids.index(suf)
        assert k - 1 == row.n_left and len(ids) - k - 2 == row.n_right
        data = files[row.source]
        left, right = data[:row.start_byte].decode(), data[row.end_byte:].decode()
        assert left.endswith(tok.decode(ids[1:k]))
        assert right.startswith(tok.decode(ids[k + 1:-1]))
        # The target as tokenized after <fim_middle> inside the full prompt.
        full = tok(tok.decode(ids) + row.target, add_special_tokens=False)["input_ids"]
        assert full[:256] == ids and full[256] == row.target_token_id
        if row.window_rule == "centre":
            assert (row.n_left, row.n_right) == (127, 126)


def test_seed_reproduces_and_changes(corpus, tmp_path, mined_left):
    root, _ = corpus
    df, _ = mined_left
    again = mine(tmp_path / "a", corpus=str(root), model="smollm2", per_task=8, per_file=2, seed=3,
                 train_per_task=0)
    pd.testing.assert_frame_equal(df, again)
    other = mine(tmp_path / "b", corpus=str(root), model="smollm2", per_task=8, per_file=2, seed=4,
                 train_per_task=0)
    assert not df[["task", "source", "start_byte"]].equals(other[["task", "source", "start_byte"]])


def test_rows_spread_over_files(mined_left):
    df, _ = mined_left
    per_file = df[df.task != "noise"].groupby(["task", "source"]).size()
    assert per_file.max() <= 2
    assert df[df.task == "identifiers"].source.nunique() >= 4


def test_manifest_records_counts_and_versions(mined_left):
    _, out = mined_left
    man = json.loads((out / "manifest.json").read_text())
    assert man["mine"]["counts"] == {t: 8 for t in TASKS}
    assert man["mine"]["window"] == 256 and man["mine"]["seed"] == 3
    assert "torch" in man["apmae_gpu"] and "tree-sitter" in man["apmae_gpu"]
    assert man["mine"]["window_rules"]["left"] == 80


def test_noise_is_uniform_vocabulary_without_specials(mined_left, smol_tokenizer):
    df, _ = mined_left
    noise = np.stack(df[df.task == "noise"].input_ids.map(np.asarray).to_list())
    assert noise.shape == (8, 256)
    assert not np.isin(noise, smol_tokenizer.all_special_ids).any()
    assert noise.min() >= 0 and noise.max() < len(smol_tokenizer)
    assert len(np.unique(noise)) > 1500  # 2048 uniform draws from ~49k ids are mostly distinct
    assert (df[df.task == "noise"].target_token_id == -1).all()


def test_prompt_builder_skips_short_files(smol_tokenizer, fim_tokenizer_dir):
    from transformers import AutoTokenizer

    text = "class A { int x = 1; }"
    with pytest.raises(Skip, match="too_short"):
        PromptBuilder(smol_tokenizer, 256).build(text, 15, 16)
    fim = PromptBuilder(AutoTokenizer.from_pretrained(fim_tokenizer_dir), 256)
    with pytest.raises(Skip, match="too_short"):
        fim.build(text, 15, 16)
    # Exactly fitting text uses the whole file.
    src = java_source("Fit", n_methods=3)
    ids = fim._ids(src)
    cut = len(fim.tok.decode(ids[:120]))
    words = src[cut:]
    hole = len(src) - len(words) + words.index("total")
    fitted = fim.build(src, hole, hole + 5)
    assert len(fitted["input_ids"]) == 256 and fitted["window_rule"] in ("head", "tail")


def test_bad_files_are_skipped_and_counted(tmp_path, corpus):
    root, files = corpus
    bad = tmp_path / "bad"
    write_java_tree(bad, n_files=6)
    (bad / "empty.java").write_bytes(b"")
    (bad / "binary.java").write_bytes(b"\x00\x01\x02class A {}" * 10)
    (bad / "latin1.java").write_bytes("class Café { String s = \"é\"; }".encode("latin-1"))
    (bad / "huge.java").write_bytes(b"class H { int x; }\n" * 60_000)
    (bad / "broken.java").write_bytes(b"class { int x = ; ) ) } }" * 40)
    df = mine(tmp_path / "run", corpus=str(bad), model="smollm2", per_task=100, per_file=2, seed=3,
              max_file_bytes=500_000, train_per_task=0)
    skipped = json.loads((tmp_path / "run" / "manifest.json").read_text())["mine"]["skipped"]
    for reason in ("empty", "binary", "non_utf8", "huge", "unparsable"):
        assert skipped.get(reason) == 1, (reason, skipped)
    assert not df.source.isin(["empty.java", "binary.java", "latin1.java", "huge.java"]).any()
    # a file with parse errors loses the candidates touching them (all but a few brackets
    # here), not its random spans (tests/test_mining_windows.py checks the spans)
    assert "random_masking" in set(df[df.source == "broken.java"].task) <= {
        "random_masking", "closing_brackets"}


def test_non_ascii_files_keep_byte_offsets(tmp_path):
    src = java_source("Uni", n_methods=6).replace("text with", "téxt wïth ünïcödé ✓")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "Uni.java").write_text(src, encoding="utf-8")
    df = mine(tmp_path / "run", corpus=str(tmp_path / "src"), model="smollm2",
              tasks="string_literals,identifiers", per_task=6, per_file=6, seed=1,
              train_per_task=0)
    data = src.encode("utf-8")
    for row in df.itertuples():
        assert data[row.start_byte:row.end_byte].decode("utf-8") == row.target
    assert any("✓" in t for t in df.target)


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "identifiers,nope"], "unknown task nope"),
    (["--corpus", "/nonexistent/dir"], "does not exist"),
])
def test_cli_errors_are_one_line(argv, message, corpus, tmp_path, capsys):
    root, _ = corpus
    args = {"--corpus": str(root), "--model": "smollm2", "--out": str(tmp_path / "r"),
            "--tasks": "all"}
    args.update(dict(zip(argv[::2], argv[1::2])))
    with pytest.raises(SystemExit) as exc:
        main(["mine", *[x for kv in args.items() for x in kv]])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_model_without_tokenizer_is_a_one_line_error(corpus, tmp_path, capsys):
    root, _ = corpus
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["mine", "--corpus", str(root), "--model", str(empty), "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "no usable tokenizer" in err and "\n" not in err


def test_java_targets_ignore_comments_and_strings():
    src = b'class A { /* a + b ) ] } == */ // x += 1;\n String s = "( ) ] } + ;"; }\n'
    java = JavaTargets()
    found = java.find(java.parse(src), src)
    assert found["mathematical_operators"] == [] and found["assignment_operators"] == []
    assert found["boolean_operators"] == []
    assert [src[t.start_byte:t.end_byte] for t in found["closing_brackets"]] == [b"}"]
    assert [src[t.start_byte:t.end_byte] for t in found["string_literals"]] == [b'"( ) ] } + ;"']
    assert len(found["end_of_line"]) == 0  # the only ; is followed by a space and }
