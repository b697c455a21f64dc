"""Fidelity to the paper and its reference package: the AP-MAE input equals the reference's
log_normalize on real SmolLM2 maps, end-of-line holes are `;` + line break, identifiers are
`identifier` nodes, noise has the reference's FIM layout and a task's total as its quota,
training and analysis prompts never share a source file, intervention groups are drawn per
inference, and the StarCoder2 configs give the paper's counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from apmae_gpu import TASKS
from apmae_gpu.capture import llm
from apmae_gpu.capture.maps import capture, forward_with_maps, kept_target, split_rows
from apmae_gpu.core.config import load_config
from apmae_gpu.core.scaling import LOG_FILL
from apmae_gpu.core.store import MapStore
from apmae_gpu.intervention.ablation import head_groups, sampled_mask
from apmae_gpu.mining.corpus import default_jdk_src, open_corpus
from apmae_gpu.mining.tasks import mine, noise_rows
from apmae_gpu.model.network import APMAEModel, preset_config
from tests.java_fixtures import write_java_tree

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- 1. scaling
def reference_log_normalize(p: np.ndarray) -> np.ndarray:
    """The reference package's scaler, written from its definition: x = ln p; m = min of x
    with -inf counted as 0; (x - m) / (-m); -inf -> 0 (float64 here)."""
    with np.errstate(divide="ignore"):
        x = np.log(p.astype(np.float64))
    m = np.where(np.isfinite(x), x, 0.0).min(axis=(-2, -1), keepdims=True)
    with np.errstate(invalid="ignore"):
        y = (x - m) / (-m)
    return np.where(np.isfinite(x), y, 0.0)


@pytest.fixture(scope="module")
def smol_maps():
    """Stored ``log`` maps of SmolLM2 on a 256-token JDK (or fixture) prompts, and the same
    prompts' float32 eager attention probabilities."""
    lm = llm.load_model("smollm2", device="cpu")
    fam = llm.family(lm)
    tok = llm.load_tokenizer("smollm2")
    jdk = default_jdk_src()
    texts = []
    if jdk:
        for _, data in open_corpus(jdk).iter_files(seed=0):
            ids = tok(data.decode("utf-8", "replace"), add_special_tokens=False)["input_ids"]
            if len(ids) >= 256:
                texts.append(ids[:256])
            if len(texts) == 1:
                break
    while len(texts) < 1:
        from tests.java_fixtures import java_source

        texts.append(tok(java_source(f"A{len(texts)}"), add_special_tokens=False)["input_ids"][:256])
    ids = torch.tensor(texts)
    _, stored = forward_with_maps(lm, fam, ids, [None] * fam.n_layers, "log")
    lm.set_attn_implementation("eager")
    with torch.inference_mode():
        probs = torch.stack(lm(input_ids=ids, output_attentions=True, use_cache=False).attentions, 1)
    return stored.float().numpy(), probs.float().numpy()


def test_default_path_matches_the_reference_log_normalize_on_real_maps(smol_maps):
    stored, probs = smol_maps                     # [B, L, H, T, T]
    low = np.tril(np.ones(probs.shape[-2:], bool))
    tiny = ((probs < 1e-8) & low).any(axis=(-2, -1))
    assert tiny.mean() > 0.3                      # many real maps have p < 1e-8 somewhere
    ref = reference_log_normalize(probs)
    # The default path: capture's default scaler, then the model built from the manifest's
    # scaler (preset_config(..., stored_scaler="log")).
    model = APMAEModel(preset_config("tiny", stored_scaler="log"))
    got = model.transform(torch.from_numpy(stored.reshape(-1, 256, 256))).numpy().reshape(ref.shape)
    err = np.abs(got - ref)[..., low]
    assert err.max() <= 2e-3                      # the fp16 storage error only
    assert np.abs(got[..., ~low]).max() == 0.0
    # The old floor at 1e-8 is what the fix removes: on the maps with p < 1e-8 it differs.
    floored = np.log(np.maximum(probs, 1e-8))
    lo = np.where(low, floored, 0).min(axis=(-2, -1), keepdims=True)
    old = np.where(low, (floored - lo) / (-lo), 0)
    assert np.abs(old - ref)[tiny][:, low].max() > 0.3


def test_stored_log_maps_hold_unfloored_logs_and_a_zero_fill(smol_maps):
    stored, probs = smol_maps
    low = np.tril(np.ones(probs.shape[-2:], bool))
    assert (stored[..., ~low] == LOG_FILL).all()
    pos = (probs > 0) & low
    with np.errstate(divide="ignore"):
        expect = np.log(probs)
    rel = np.abs(stored[pos] - expect[pos]) / np.maximum(1.0, np.abs(expect[pos]))
    assert rel.max() < 2e-3
    assert stored[pos].min() < np.log(1e-8)       # no floor at 1e-8 any more


def test_log_normalize_store_and_zero_probabilities_follow_the_reference():
    from apmae_gpu.core.scaling import scale_maps

    rng = np.random.default_rng(1)
    T = 16
    s = rng.standard_normal((4, T, T)) * 30
    low = np.tril(np.ones((T, T), bool))
    s = np.where(low, s, -np.inf)
    s[1, 9, :4] = -np.inf                          # exact zeros inside the lower triangle
    p = np.exp(s - s.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    ref = reference_log_normalize(p)
    direct = scale_maps(torch.from_numpy(p), "log_normalize").numpy()
    np.testing.assert_allclose(direct, ref, atol=1e-5)
    stored = scale_maps(torch.from_numpy(p), "log").half().float()
    model = APMAEModel(preset_config("tiny", image_size=16, patch_size=4, stored_scaler="log"))
    np.testing.assert_allclose(model.transform(stored).numpy(), ref, atol=2e-3)
    assert model.transform(stored).numpy()[1, 9, :4].tolist() == [0.0] * 4


def test_legacy_floored_stores_read_as_before():
    """Stores written with the old 1e-8 floor keep their transform (log_floor=1e-8)."""
    T = 8
    x = np.full((1, T, T), np.log(1e-8), np.float32)
    x[0][np.tril_indices(T)] = -3.0
    x[0, 0, 0] = 0.0
    x[0, 5, 1] = np.log(1e-8)                      # a floored value inside the triangle
    model = APMAEModel(preset_config("tiny", image_size=8, patch_size=2, stored_scaler="log",
                                     log_floor=1e-8))
    got = model.transform(torch.from_numpy(x)).numpy()[0]
    assert got[5, 1] == 0.0 and got[0, 0] == pytest.approx(1.0)
    assert got[3, 2] == pytest.approx((-3.0 - np.log(1e-8)) / -np.log(1e-8), abs=1e-6)


# --------------------------------------------------------------------------- 2-4. mining
def _bpe_with_semicolon_newline(path: Path, corpus_text: str) -> Path:
    """A small byte-level BPE tokenizer trained on Java without a pre-tokenizer split, so it
    merges `;` with the line break; plus StarCoder2's FIM tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus_text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])
    fast.save_pretrained(path)
    return path


def test_end_of_line_hole_is_semicolon_and_line_break(tmp_path):
    files = write_java_tree(tmp_path / "java", n_files=4)
    tok_dir = _bpe_with_semicolon_newline(tmp_path / "tok", "".join(d.decode() for d in files.values()))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    merged = tok.convert_tokens_to_ids(";Ċ")
    assert merged != tok.unk_token_id and merged is not None   # the tokenizer merges `;\n`
    df = mine(tmp_path / "run", corpus=str(tmp_path / "java"), model=str(tok_dir),
              tasks="end_of_line", per_task=6, per_file=2, window=64, seed=0, train_per_task=0)
    assert len(df) == 6 and df.fim.all()
    suf = tok.convert_tokens_to_ids("<fim_suffix>")
    for row in df.itertuples():
        assert row.target.startswith(";") and row.target.endswith("\n")
        data = files[row.source]
        # the right context starts on the next line
        assert data[row.end_byte - 1:row.end_byte] == b"\n"
        first_middle = tok.decode([row.target_token_id])
        assert first_middle.startswith(";\n"), repr(first_middle)
        ids = list(row.input_ids)
        right = tok.decode(ids[ids.index(suf) + 1:ids.index(suf) + 4])
        assert not right.startswith("\n")


def test_identifiers_are_identifier_nodes_unless_asked(tmp_path):
    write_java_tree(tmp_path / "java", n_files=6)
    plain = mine(tmp_path / "a", corpus=str(tmp_path / "java"), model="smollm2",
                 tasks="identifiers", per_task=40, per_file=20, window=64, seed=1,
                 train_per_task=0)
    assert set(plain.kind) == {"identifier"}
    both = mine(tmp_path / "b", corpus=str(tmp_path / "java"), model="smollm2",
                tasks="identifiers", per_task=40, per_file=20, window=64, seed=1,
                type_identifiers=True, train_per_task=0)
    assert "type_identifier" in set(both.kind)
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["mine"]["type_identifiers"]


def test_noise_has_the_reference_fim_layout(fim_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fim_tokenizer_dir)
    pre, suf, mid = (tok.convert_tokens_to_ids(t) for t in ("<fim_prefix>", "<fim_suffix>",
                                                            "<fim_middle>"))
    rows = noise_rows(tok, 64, 40, seed=0)
    special = set(tok.all_special_ids)
    where = []
    for r in rows:
        ids = r["input_ids"]
        assert len(ids) == 64 and ids[0] == pre and ids[-1] == mid and r["fim"]
        inner = [i for i, t in enumerate(ids) if t == suf]
        assert len(inner) == 1 and 1 <= inner[0] <= 62
        assert r["n_left"] + r["n_right"] + 3 == 64 and r["n_left"] == inner[0] - 1
        others = [t for i, t in enumerate(ids) if i not in (0, 63, inner[0])]
        assert not special & set(others)
        where.append(inner[0])
    assert len(set(where)) > 10                   # a random inner position per prompt
    assert rows == noise_rows(tok, 64, 40, seed=0)


def test_noise_quota_is_a_tasks_total_and_starcoder2_configs_give_the_paper_counts():
    assert kept_target("analysis", "noise", 5000) == kept_target("analysis", "identifiers", 5000) == 10_000
    paper = {"3b": (79_200_000, 720), "7b": (126_720_000, 1152), "15b": (211_200_000, 1920)}
    for name, (maps, per_inference) in paper.items():
        cfg = load_config(ROOT / "configs" / f"starcoder2-{name}.yaml")
        shape = llm.random_config(f"starcoder2-{name}")
        L, H = shape.num_hidden_layers, shape.num_attention_heads
        assert L * H == per_inference
        a = cfg.capture.analysis
        inferences = sum(kept_target("analysis", t, a.per_task) for t in TASKS)
        assert a.heads == "all" and inferences == 110_000
        assert inferences * L * H == maps
        # Training: ~72M maps, 25% of each layer's heads per inference (Table 1's data).
        t = cfg.capture.train
        assert t.heads == "layerwise:0.25"
        assert t.per_task * L * round(0.25 * H) == 72_000_000
        assert cfg.capture.dtype == "float32" and cfg.intervene.dtype == "float32"
        assert cfg.intervene.task is None and cfg.intervene.rank_by == "shap_parts"
        assert cfg.mine.corpus.endswith("split=test") and cfg.mine.train_corpus.endswith("split=train")


# --------------------------------------------------------------------------- 5. splits
@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("splits")
    write_java_tree(base / "java", n_files=12)
    run = base / "run"
    mine(run, corpus=str(base / "java"), model="random:tiny-llama", per_task=3, train_per_task=5,
         window=64, seed=0)
    return run


def test_training_and_analysis_prompts_never_share_a_source_file(split_run):
    tasks = pd.read_parquet(split_run / "tasks.parquet")
    train = tasks[tasks.split == "train"]
    analysis = tasks[(tasks.split == "analysis") & (tasks.task != "noise")]
    assert len(train) == 5 and set(train.task) == {"random_masking"}
    assert set(analysis.task) == set(TASKS) - {"noise"}
    assert not set(train.source) & set(analysis.source)
    man = json.loads((split_run / "manifest.json").read_text())["mine"]
    assert man["train_counts"] == {"random_masking": 5}
    assert man["files_per_split"]["train"] + man["files_per_split"]["analysis"] <= 12
    # Capture keeps to the rows mined for each split.
    capture(split_run, "random:tiny-llama", split="train", per_task=1, batch_size=4,
            device="cpu", max_attempts=5)
    capture(split_run, "random:tiny-llama", split="analysis", per_task=1, batch_size=8,
            device="cpu", max_attempts=3)
    inf = MapStore(split_run).inferences().merge(tasks[["task_id", "source", "split"]],
                                                 on="task_id", suffixes=("", "_mined"))
    assert (inf.split == inf.split_mined).all()
    real = inf[inf.task != "noise"]
    assert not set(real[real.split == "train"].source) & set(real[real.split == "analysis"].source)


def test_a_split_skips_files_another_split_prompted():
    tasks = pd.DataFrame({"task_id": [0, 1, 2, 3, 4], "task": ["random_masking", "identifiers",
                          "random_masking", "noise", "noise"],
                          "source": ["A.java", "A.java", "B.java", "noise", "noise"]})
    # Legacy tables (no split column): analysis may not take A.java once train prompted row 0;
    # noise rows share no file, so only a used noise row itself is skipped.
    assert split_rows(tasks, "analysis", {0}).task_id.tolist() == [2, 3, 4]
    assert split_rows(tasks, "analysis", {0, 3}).task_id.tolist() == [2, 4]
    tasks["split"] = ["train", "analysis", "analysis", "analysis", "analysis"]
    assert split_rows(tasks, "train", set()).task_id.tolist() == [0]
    assert split_rows(tasks, "analysis", set()).task_id.tolist() == [1, 2, 3, 4]


def test_train_corpus_and_the_heaps_duplicate_flags(tmp_path):
    files = write_java_tree(tmp_path / "java", n_files=6)
    names = sorted(files)
    table = pa.table({"path": names, "content": [files[n].decode() for n in names],
                      "exact_duplicates_stackv2": [False, True, False, False, False, False],
                      "near_duplicates_redpajama": [False, False, True, False, False, None]})
    pq.write_table(table, tmp_path / "heap.parquet")
    for spec in (str(tmp_path / "heap.parquet"), f"hf:{tmp_path / 'heap.parquet'}"):
        # the reference drops the Stack v2 flags only; `all` drops every flag's rows
        src = open_corpus(spec)
        seen = [s for s, _ in src.iter_files(seed=0)]
        assert sorted(seen) == [names[0], *names[2:]]
        assert src.describe()["duplicates_filtered"] == 1
        assert src.describe()["duplicates_by_flag"] == {"exact_duplicates_stackv2": 1}
        src = open_corpus(spec, dedup_flags="all")
        seen = [s for s, _ in src.iter_files(seed=0)]
        assert sorted(seen) == [names[0], *names[3:]]
        assert src.describe()["duplicates_filtered"] == 2
        assert src.describe()["duplicates_by_flag"] == {"exact_duplicates_stackv2": 1,
                                                        "near_duplicates_redpajama": 1}
    # Training rows from their own corpus; the analysis rows from the other.
    other = write_java_tree(tmp_path / "train_java", n_files=3)
    run = tmp_path / "run"
    df = mine(run, corpus=f"hf:{tmp_path / 'heap.parquet'}", model="random:tiny-llama", per_task=2,
              train_per_task=3, window=64, train_corpus=str(tmp_path / "train_java"),
              dedup_flags="all")
    assert set(df[df.split == "train"].source) <= set(other)
    assert set(df[(df.split == "analysis") & (df.task != "noise")].source) <= {names[0], *names[3:]}
    man = json.loads((run / "manifest.json").read_text())["mine"]
    assert man["corpus"]["duplicates_filtered"] == 2 and man["train_corpus"]["kind"] == "directory"
    assert man["corpus"]["duplicates_by_flag"]["near_duplicates_redpajama"] == 1


# --------------------------------------------------------------------------- 6. intervention
def _importance(L: int, H: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = L * H
    mean = rng.normal(0, 0.1, n)
    mean[:10] = 0.0                                # ten neutral heads
    pos = np.abs(rng.normal(0, 0.1, n))
    neg = -np.abs(rng.normal(0, 0.1, n))
    return pd.DataFrame({"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
                         "importance": np.abs(mean), "mean_shap": mean, "extreme_shap": mean,
                         "mean_shap_pos": pos, "mean_shap_neg": neg})


def test_random_and_neutral_groups_are_drawn_anew_per_inference_and_k():
    L, H = 4, 8
    imp = _importance(L, H)
    conds = head_groups(imp, L, H, [2, 5], ["positive", "negative", "zero", "random"], 0, "t")
    ids = np.arange(30)
    r5 = sampled_mask(conds[("random", 5)], 5, ids, L, H, 0, "t", "random")
    r2 = sampled_mask(conds[("random", 2)], 2, ids, L, H, 0, "t", "random")
    assert (r5.reshape(30, -1).sum(1) == 5).all()                 # k distinct heads each
    assert len({m.tobytes() for m in r5}) > 25                    # redrawn per inference
    assert any(not (a <= b).all() for a, b in zip(r2, r5))        # and per k (not nested)
    again = sampled_mask(conds[("random", 5)], 5, ids, L, H, 0, "t", "random")
    assert (again == r5).all()                                    # seeded: reruns agree
    z = sampled_mask(conds[("zero", 5)], 5, ids, L, H, 0, "t", "zero")
    pool = set(np.flatnonzero(np.abs(imp["mean_shap"].to_numpy()) <= 1e-5))
    assert pool == set(range(10))
    assert all(set(np.flatnonzero(m.ravel())) <= pool for m in z)
    assert (z.reshape(30, -1).sum(1) <= 5).all() and (z.reshape(30, -1).sum(1) < 5).any()
    # Positive/negative: ranked by the mean of the positive / negative SHAP parts.
    top = imp.sort_values("mean_shap_pos", ascending=False).head(5)
    assert set(conds[("positive", 5)]["heads"]) == set(zip(top.layer, top["head"]))
    low = imp.sort_values("mean_shap_neg").head(5)
    assert set(conds[("negative", 5)]["heads"]) == set(zip(low.layer, low["head"]))
    signed = head_groups(imp, L, H, [5], ["positive"], 0, "t", rank_by="mean_shap")
    top_signed = imp.sort_values("mean_shap", ascending=False).head(5)
    assert set(signed[("positive", 5)]["heads"]) == set(zip(top_signed.layer, top_signed["head"]))
