"""Every corpus kind reads the same files, streamed in a seeded order."""

from __future__ import annotations

import json
import zipfile

import pandas as pd
import pytest

from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.mining.corpus import TooLarge, open_corpus
from apmae_gpu.mining.tasks import mine
from tests.java_fixtures import write_java_tree


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpora")
    files = write_java_tree(base / "tree", n_files=6)
    (base / "tree" / "README.md").write_text("not java")
    with zipfile.ZipFile(base / "src.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for rel, data in files.items():
            z.writestr(rel, data)
        z.writestr("docs/readme.txt", "not java")
    records = [{"path": rel, "content": data.decode(), "size": len(data)}
               for rel, data in sorted(files.items())]
    with open(base / "files.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    frame = pd.DataFrame(records)
    frame.to_parquet(base / "files.parquet", row_group_size=2)
    (base / "hfdata").mkdir()
    frame.to_parquet(base / "hfdata" / "train-00000.parquet")
    return base, files


KINDS = {
    "directory": "tree",
    "zip": "src.zip",
    "jsonl": "files.jsonl",
    "parquet": "files.parquet",
    "huggingface": "hf:{base}/hfdata",
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_reads_the_same_files(kind, sources):
    base, files = sources
    spec = KINDS[kind].format(base=base)
    corpus = open_corpus(spec if spec.startswith("hf:") else str(base / spec))
    assert corpus.kind == kind
    got = dict(corpus.iter_files(seed=0))
    assert got == files


@pytest.mark.parametrize("kind", ["directory", "zip", "jsonl", "huggingface"])
def test_random_access_kinds_share_one_seeded_order(kind, sources):
    base, _ = sources
    ref = [s for s, _ in open_corpus(str(base / "tree")).iter_files(seed=7)]
    spec = KINDS[kind].format(base=base)
    corpus = open_corpus(spec if spec.startswith("hf:") else str(base / spec))
    assert [s for s, _ in corpus.iter_files(seed=7)] == ref
    assert [s for s, _ in corpus.iter_files(seed=8)] != ref


def test_parquet_order_is_seeded(sources):
    base, _ = sources
    corpus = open_corpus(str(base / "files.parquet"))
    a = [s for s, _ in corpus.iter_files(seed=1)]
    assert a == [s for s, _ in corpus.iter_files(seed=1)]
    assert sorted(a) == sorted(s for s, _ in corpus.iter_files(seed=2))


def test_mining_from_zip_equals_mining_from_directory(sources, tmp_path):
    base, _ = sources
    a = mine(tmp_path / "a", corpus=str(base / "tree"), model="smollm2", per_task=4, seed=5,
             tasks="identifiers,closing_brackets,random_masking", train_per_task=0)
    b = mine(tmp_path / "b", corpus=str(base / "src.zip"), model="smollm2", per_task=4, seed=5,
             tasks="identifiers,closing_brackets,random_masking", train_per_task=0)
    pd.testing.assert_frame_equal(a, b)


def test_too_large_files_are_not_read(sources):
    base, files = sources
    corpus = open_corpus(str(base / "src.zip"))
    limit = sorted(len(d) for d in files.values())[2]
    out = dict(corpus.iter_files(seed=0, max_bytes=limit))
    assert sum(isinstance(v, TooLarge) for v in out.values()) == sum(
        len(d) > limit for d in files.values())


@pytest.mark.parametrize("spec,message", [
    ("/no/such/dir", "does not exist"),
    ("{base}/files.parquet?", "does not exist"),
    ("{base}/tree/README.md", "unknown kind"),
])
def test_bad_corpus_specs(spec, message, sources):
    base, _ = sources
    with pytest.raises(ApmaeError, match=message):
        open_corpus(spec.format(base=base))


def test_missing_content_column_is_named(sources):
    base, _ = sources
    with pytest.raises(ApmaeError, match="no column 'text'"):
        open_corpus(str(base / "files.parquet"), content_column="text")
