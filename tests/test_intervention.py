"""Head ablation checked against an eager recomputation of attention on tiny random-weight
Llama, Starcoder2 and GPT-2 models; hook hygiene; head groups; statistics; and the intervene
stage end to end on a small run judged by a tiny model."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from apmae_gpu.capture.llm import family, load_model
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import read_manifest, update_manifest
from apmae_gpu.intervention import ablation as I
from apmae_gpu.intervention import stats as S

SHAPES = ("tiny-llama", "tiny-starcoder2", "tiny-gpt2")
_MODELS: dict[str, torch.nn.Module] = {}


def tiny(shape: str):
    if shape not in _MODELS:
        _MODELS[shape] = load_model(f"random:{shape}", device="cpu")
    return _MODELS[shape]


def hooks_on(fam) -> int:
    return sum(len(p._forward_pre_hooks) for p in fam.out_proj)


# --------------------------------------------------------------------------- the reference
def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def reference_attention(attn, fam, hidden, kwargs, ablate_rows):
    """Eager causal attention of one layer from its input ``hidden`` [B, T, E], with the heads
    in ``ablate_rows`` (bool [B, H]) left out of the concatenation before the output
    projection.  Written from the architectures' definitions, not from the hook."""
    B, T, _ = hidden.shape
    H, D, KV = fam.n_heads, fam.head_dim, fam.n_kv_heads
    if fam.name == "gpt2":
        q, k, v = attn.c_attn(hidden).split(H * D, dim=2)
        q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in (q, k, v))
        out_proj = attn.c_proj
    else:
        q = attn.q_proj(hidden).view(B, T, H, D).transpose(1, 2)
        k = attn.k_proj(hidden).view(B, T, KV, D).transpose(1, 2)
        v = attn.v_proj(hidden).view(B, T, KV, D).transpose(1, 2)
        cos, sin = (x.unsqueeze(1) for x in kwargs["position_embeddings"])
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        out_proj = attn.o_proj
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    per_head = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v      # [B, H, T, D]
    per_head = per_head * (~ablate_rows)[:, :, None, None]
    return out_proj(per_head.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("shape", SHAPES)
def test_ablation_equals_the_layer_computed_without_the_head(shape):
    model = tiny(shape)
    fam = family(model)
    assert fam.n_layers == 2 and fam.n_heads == 4
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (3, 10))
    ablate = torch.zeros(3, fam.n_layers, fam.n_heads, dtype=torch.bool)
    ablate[0, 1, 2] = True          # sample 0: one head of the last layer (+ one earlier)
    ablate[0, 0, 1] = True
    ablate[2, 1, :] = True          # sample 2: the whole last layer; sample 1: nothing
    attn = fam.attention[1]
    seen = {}

    def grab_in(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = kwargs

    def grab_out(module, args, kwargs, output):
        seen["out"] = output[0]

    h1 = attn.register_forward_pre_hook(grab_in, with_kwargs=True)
    h2 = attn.register_forward_hook(grab_out, with_kwargs=True)
    try:
        with torch.no_grad(), I.ablate_heads(model, ablate):
            model(input_ids=ids, use_cache=False)
        with torch.no_grad():
            ref = reference_attention(attn, fam, seen["hidden"], seen["kwargs"], ablate[:, 1, :])
    finally:
        h1.remove()
        h2.remove()
    torch.testing.assert_close(seen["out"], ref, atol=2e-5, rtol=1e-4)
    # Sample 2 (whole layer off): only the projection's bias is left.
    bias = fam.out_proj[1].bias
    if bias is not None:
        torch.testing.assert_close(seen["out"][2], bias.expand(10, -1), atol=1e-6, rtol=0)
    else:
        assert seen["out"][2].abs().max() == 0


@pytest.mark.parametrize("shape", ("tiny-llama", "tiny-gpt2"))
def test_per_sample_masks_equal_separate_runs(shape):
    model = tiny(shape)
    fam = family(model)
    torch.manual_seed(1)
    ids = torch.randint(0, 49152, (3, 9))
    masks = [I.head_mask([], 2, 4), I.head_mask([(0, 3)], 2, 4), I.head_mask([(1, 0), (1, 3)], 2, 4)]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with I.ablate_heads(model, torch.stack(masks)):
            batched = model(input_ids=ids).logits
        for i, m in enumerate(masks):
            with I.ablate_heads(model, m):
                alone = model(input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched[0], plain[0], atol=1e-5, rtol=1e-4)
    assert (batched[1] - plain[1]).abs().max() > 1e-4       # the ablation does something
    # A scale of 1 everywhere installs nothing; 0.5 halves a head (a modulation, not only off).
    with I.scale_heads(model, torch.ones(2, 4)):
        assert hooks_on(fam) == 0
    half = torch.ones(2, 4)
    half[1, 2] = 0.5
    with I.scale_heads(model, half):
        assert hooks_on(fam) == 1


def test_hooks_are_always_removed():
    model = tiny("tiny-llama")
    fam = family(model)
    mask = I.head_mask([(0, 1), (1, 2)], 2, 4)
    with I.ablate_heads(model, mask) as f:
        assert f.n_heads == 4 and hooks_on(fam) == 2
    assert hooks_on(fam) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with I.ablate_heads(model, mask):
            assert hooks_on(fam) == 2
            raise RuntimeError("boom")
    assert hooks_on(fam) == 0
    # A per-sample mask for the wrong batch size fails inside the forward; hooks still go.
    with pytest.raises(ValueError, match="2 rows, the batch 3"):
        with torch.no_grad(), I.ablate_heads(model, mask.expand(2, 2, 4)):
            model(input_ids=torch.zeros(3, 4, dtype=torch.long))
    assert hooks_on(fam) == 0
    with pytest.raises(ValueError, match=r"\[2, 4\] or \[B, 2, 4\]"):
        with I.ablate_heads(model, torch.zeros(3, 4, dtype=torch.bool)):
            pass
    with pytest.raises(ValueError, match="outside 2 layers"):
        I.head_mask([(2, 0)], 2, 4)


def test_family_without_output_projection_is_a_clear_error():
    model = load_model("random:tiny-llama", device="cpu")
    for attn in family(model).attention:
        attn.renamed_proj = attn.o_proj
        del attn.o_proj
    with pytest.raises(ApmaeError, match="no known attention output projection"):
        with I.ablate_heads(model, I.head_mask([(0, 0)], 2, 4)):
            pass


@pytest.mark.parametrize("shape", ("tiny-llama", "tiny-gpt2"))
def test_greedy_with_cache_equals_recomputation(shape):
    model = tiny(shape)
    torch.manual_seed(2)
    ids = torch.randint(0, 49152, (2, 8))
    ablate = torch.stack([I.head_mask([(0, 0), (1, 1)], 2, 4), I.head_mask([(1, 3)], 2, 4)])
    with I.ablate_heads(model, ablate):
        cached = I.greedy_complete(model, ids, 4)
        seq = ids.clone()
        for _ in range(4):                               # no cache: whole sequence each step
            nxt = I.first_tokens(model, seq)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        first = I.first_tokens(model, ids)
    assert cached.shape == (2, 4)
    torch.testing.assert_close(cached, seq[:, 8:])
    torch.testing.assert_close(cached[:, 0], first)


# --------------------------------------------------------------------------- groups, stats
def test_head_groups_take_consensus_heads_first():
    imp = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                        "mean_shap": [0.1, 0.1, -0.1, -0.1], "importance": 0.1,
                        "mean_shap_pos": [0.4, 0.3, 0.2, 0.1],
                        "mean_shap_neg": [-0.1, -0.2, -0.3, -0.4],
                        "p_top_pos": [0.2, 0.9, 0.5, 0.0], "p_top_neg": [1.0, 0.0, 0.0, 0.5]})
    g = I.head_groups(imp, 2, 2, [2], ["positive", "negative"], seed=0, task="t")
    assert g[("positive", 2)]["heads"] == [(0, 1), (1, 0)]
    assert g[("negative", 2)]["heads"] == [(0, 0), (1, 1)]
    # without stability selection (NaN): the SHAP ranking alone
    g = I.head_groups(imp.assign(p_top_pos=np.nan, p_top_neg=np.nan), 2, 2, [2],
                      ["positive", "negative"], seed=0, task="t")
    assert g[("positive", 2)]["heads"] == [(0, 0), (0, 1)]
    assert g[("negative", 2)]["heads"] == [(1, 1), (1, 0)]


def test_head_groups():
    imp = pd.DataFrame({"layer": [0, 0, 0, 1, 1, 1], "head": [0, 1, 2, 0, 1, 2],
                        "mean_shap": [0.3, -0.2, 0.0, 1e-6, 0.1, -0.5],
                        "mean_shap_pos": [0.4, 0.1, 0.0, 0.0, 0.6, 0.2],
                        "mean_shap_neg": [-0.1, -0.3, 0.0, 0.0, -0.5, -0.7],
                        "extreme_shap": [1, 2, 3, 4, 5, 6],
                        "importance": [0.9, 0.1, 0.0, 0.2, 0.5, 0.3]})
    groups = ["positive", "negative", "zero", "random", "importance"]
    g = I.head_groups(imp, 2, 3, [1, 2, 3, 6], groups, seed=0, task="t")
    # the reference's ranking: mean of the positive / negative parts of the SHAP values
    assert g[("positive", 3)]["heads"] == [(1, 1), (0, 0), (1, 2)]
    assert g[("positive", 3)]["n_in_group"] == 3 and g[("positive", 6)]["n_in_group"] == 4
    assert g[("negative", 2)]["heads"] == [(1, 2), (1, 1)]
    assert g[("importance", 2)]["heads"] == [(0, 0), (1, 1)]
    # the signed mean, an option
    signed = I.head_groups(imp, 2, 3, [2, 3], groups, seed=0, task="t", rank_by="mean_shap")
    assert signed[("positive", 3)]["heads"] == [(0, 0), (1, 1), (1, 0)]
    assert signed[("negative", 2)]["heads"] == [(1, 2), (0, 1)]
    # sampled groups: a pool to draw from per inference
    assert g[("zero", 2)]["heads"] is None and sorted(g[("zero", 2)]["pool"]) == [2, 3]
    assert g[("zero", 2)]["replace"] and not g[("random", 6)]["replace"]
    assert sorted(g[("random", 6)]["pool"]) == list(range(6))
    ids = np.arange(20)
    draw = I.sampled_mask(g[("random", 2)], 2, ids, 2, 3, 0, "t", "random")
    assert (draw.reshape(20, -1).sum(1) == 2).all() and len({d.tobytes() for d in draw}) > 5
    other = I.sampled_mask(g[("random", 2)], 2, ids, 2, 3, 1, "t", "random")
    assert (other != draw).any()                                        # seeded by --seed
    by_extreme = I.head_groups(imp, 2, 3, [1], ["positive"], 0, "t", rank_by="extreme_shap")
    assert by_extreme[("positive", 1)]["heads"] == [(1, 2)]
    no_zero = I.head_groups(imp.assign(mean_shap=1.0), 2, 3, [1], ["zero"], 0, "t")
    assert no_zero == {}                                                # no neutral head


def test_statistics():
    assert S.mcnemar_exact(0, 6) == pytest.approx(2 * 0.5 ** 6)
    assert S.mcnemar_exact(3, 3) == pytest.approx(1.0) and S.mcnemar_exact(0, 0) == 1.0
    adj = S.holm(np.array([0.01, 0.04, 0.03, np.nan]))
    np.testing.assert_allclose(adj[:3], [0.03, 0.06, 0.06])
    assert np.isnan(adj[3])


# --------------------------------------------------------------------------- the stage
WINDOW = 12


def write_intervention_run(run: Path) -> Path:
    """tasks.parquet, inferences.parquet, head importance and a manifest for tiny-llama.

    identifiers: 40 prompts; 0-15 analysis with maps (the classifier's, never held out),
    16-25 surplus attempts (has_maps False), 26-39 never prompted.  end_of_line: 30 prompts,
    all never prompted.  Targets: the model's own greedy 3 tokens for a third of the prompts
    (correct), a wrong first token for a third, and a right first but wrong third token for
    the rest (correct for the first token only).
    """
    model = tiny("tiny-llama")
    rng = np.random.default_rng(0)
    rows, inf_rows = [], []
    tid = 0
    for task, n in (("identifiers", 40), ("end_of_line", 30)):
        ids = torch.tensor(rng.integers(0, 49152, (n, WINDOW)))
        greedy = I.greedy_complete(model, ids, 3).numpy()
        for i in range(n):
            tgt = greedy[i].copy()
            if i % 3 == 1:
                tgt[0] = (tgt[0] + 1) % 49152
            elif i % 3 == 2:
                tgt[2] = (tgt[2] + 1) % 49152
            rows.append(dict(task_id=tid, task=task, input_ids=ids[i].tolist(),
                             target_token_id=int(tgt[0]), target_token_ids=tgt.tolist()))
            if task == "identifiers" and i < 26:
                inf_rows.append(dict(inference_id=len(inf_rows), split="analysis", task=task,
                                     task_id=tid, input_ids=ids[i].tolist(),
                                     target_token_id=int(tgt[0]), correct=i % 3 != 1,
                                     has_maps=i < 16))
            tid += 1
    run.mkdir(parents=True)
    tasks = pd.DataFrame(rows)
    tasks["input_ids"] = tasks["input_ids"].map(lambda x: np.asarray(x, np.int32))
    tasks.to_parquet(run / "tasks.parquet", index=False)
    (run / "inferences.parquet").mkdir()
    pd.DataFrame(inf_rows).to_parquet(run / "inferences.parquet" / "part-000000.parquet",
                                      index=False)
    imp = []
    for task, seed in (("identifiers", 1), ("end_of_line", 2)):
        r = np.random.default_rng(seed)
        mean = r.normal(0, 0.05, 8)
        mean[[2, 5]] = 0.0
        imp.append(pd.DataFrame({"task": task, "layer": np.repeat([0, 1], 4),
                                 "head": np.tile(np.arange(4), 2), "importance": np.abs(mean) * 4,
                                 "mean_shap": mean, "extreme_shap": mean * 3,
                                 "mean_shap_pos": np.maximum(mean, 0) + 0.01,
                                 "mean_shap_neg": np.minimum(mean, 0) - 0.01}))
    (run / "classify").mkdir()
    pd.concat(imp).to_parquet(run / "classify" / "head_importance.parquet", index=False)
    update_manifest(run, "capture", {"model": {"spec": "random:tiny-llama"}})
    update_manifest(run, "classify", {"tasks": {"identifiers": {}, "end_of_line": {}},
                                      "skipped": {"string_literals": "needs at least 2 correct"}})
    return run


@pytest.fixture(scope="module")
def intervened(tmp_path_factory):
    run = write_intervention_run(tmp_path_factory.mktemp("intervene") / "run")
    results = I.intervene(run, k=[1, 2, 100], per_group=3, device="cpu", batch_size=4, seed=0)
    return run, results


def _work(run: Path, task: str) -> Path:
    (work,) = [p for p in (run / "intervene" / "work").iterdir() if p.name.startswith(task)]
    return work


def test_intervene_results(intervened):
    run, results = intervened
    assert set(results["task"]) == {"identifiers", "end_of_line", "all"}
    assert set(results["k"]) == {1, 2} and set(results["mode"]) == {"first_token"}
    assert len(results) == 3 * 4 * 2
    # task "all": each (group, k) summed over the tasks, tested on the pooled pairs
    agg = results[results.task == "all"].set_index(["group", "k"])
    per = results[results.task != "all"].groupby(["group", "k"])
    for col in ("n", "n_correct_to_incorrect", "n_incorrect_to_correct", "net_change"):
        assert (agg[col] == per[col].sum().loc[agg.index]).all(), col
    row = agg.loc[("positive", 2)]
    assert row["n_better_than_random"] == per["n_better_than_random"].sum().loc[("positive", 2)]
    assert row["p_vs_random"] == pytest.approx(S.mcnemar_exact(row["n_better_than_random"],
                                                               row["n_worse_than_random"]))
    assert (agg["n_tasks"] == 2).all()
    r = results[results.task != "all"]
    assert (r["n_correct_to_incorrect"] + r["n_incorrect_to_correct"] + r["n_other_changes"]
            + r["n_unchanged"] == r["n"]).all()
    assert (r["net_change"] == r["n_incorrect_to_correct"] - r["n_correct_to_incorrect"]).all()
    assert (r["n"] == 6).all() and (r["n_correct_before"] == 3).all()
    assert r.loc[r.group == "random", "p_vs_random"].isna().all()
    assert r.loc[r.group != "random", "p_vs_random"].between(0, 1).all()
    assert (r["p_vs_random_holm"].fillna(1) >= r["p_vs_random"].fillna(1)).all()
    # the discordant pairs against random give the stored p-value and the accuracy gap
    rand = r[r.group == "random"].set_index(["task", "k"])
    for x in r[r.group != "random"].itertuples():
        assert x.p_vs_random == pytest.approx(S.mcnemar_exact(x.n_better_than_random,
                                                              x.n_worse_than_random))
        gap = x.accuracy_after - rand.loc[(x.task, x.k), "accuracy_after"]
        assert (x.n_better_than_random - x.n_worse_than_random) / x.n == pytest.approx(gap)
    assert (r.loc[r.group == "random", "n_better_than_random"] == -1).all()
    assert (r["n_heads"] == r["k"]).all()
    zero = r.set_index(["task", "group", "k"]).loc[("identifiers", "zero", 2)]
    assert zero["heads"] == "2 drawn per inference from 2 heads (with replacement)"
    rand = r.set_index(["task", "group", "k"]).loc[("identifiers", "random", 2)]
    assert rand["heads"] == "2 drawn per inference from 8 heads"

    section = read_manifest(run)["intervene"]
    assert section["k_skipped"] == [100] and section["k"] == [1, 2]
    assert "string_literals" in section["skipped"]
    assert "classify skipped it" in section["skipped"]["string_literals"]
    ident = section["tasks"]["identifiers"]
    assert ident["n_correct"] == 3 and ident["n_incorrect"] == 3
    assert ident["recorded_agreement"] == 1.0 and ident["inferences_per_s"] > 0
    png = run / "intervene" / "net_change.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000


def test_heldout_never_uses_the_classifiers_inferences(intervened):
    run, _ = intervened
    held = pd.read_parquet(_work(run, "identifiers") / "heldout.parquet")
    assert set(held["task_id"]).isdisjoint(range(16))       # the has_maps rows
    assert held["source"].iloc[0] == "surplus" or "surplus" in set(held["source"])
    assert held["correct_before"].sum() == 3 and len(held) == 6
    tasks = pd.read_parquet(run / "tasks.parquet").set_index("task_id")
    for _, row in held.iterrows():       # correct_before is the model's own judgement here
        assert row["correct_before"] == (row["predicted_before"][0]
                                         == tasks.loc[row["task_id"], "target_token_id"])


def test_one_condition_by_hand(intervened):
    run, results = intervened
    row = results.set_index(["task", "group", "k"]).loc[("end_of_line", "positive", 2)]
    heads = [tuple(int(x) for x in h[1:].split("H")) for h in row["heads"].split()]
    held = pd.read_parquet(_work(run, "end_of_line") / "heldout.parquet")
    ids = torch.tensor(np.stack(held["input_ids"].to_numpy()).astype(np.int64))
    model = tiny("tiny-llama")
    with I.ablate_heads(model, I.head_mask(heads, 2, 4)):
        after = I.first_tokens(model, ids).numpy()
    before = held["correct_before"].to_numpy(bool)
    ok = after == held["target_token_id"].to_numpy()
    assert row["n_correct_to_incorrect"] == int((before & ~ok).sum())
    assert row["n_incorrect_to_correct"] == int((~before & ok).sum())
    changed = after != np.array([p[0] for p in held["predicted_before"]])
    assert row["n_unchanged"] == int((~changed).sum())


def test_random_condition_by_hand_uses_a_draw_per_inference(intervened):
    run, _ = intervened
    work = _work(run, "end_of_line")
    held = pd.read_parquet(work / "heldout.parquet")
    parts = pd.concat([pd.read_parquet(p) for p in sorted(work.glob("part-*.parquet"))])
    got = parts[(parts.group == "random") & (parts.k == 2)].set_index("sample_id")
    imp = pd.read_parquet(run / "classify" / "head_importance.parquet")
    conds = I.head_groups(imp[imp.task == "end_of_line"], 2, 4, [2], ["random"], 0, "end_of_line")
    masks = I.sampled_mask(conds[("random", 2)], 2, held["sample_id"].to_numpy(), 2, 4, 0,
                           "end_of_line", "random")
    assert len({m.tobytes() for m in masks}) > 1               # not one set for all
    model = tiny("tiny-llama")
    ids = torch.tensor(np.stack(held["input_ids"].to_numpy()).astype(np.int64))
    with I.ablate_heads(model, masks):                         # a mask per sample
        after = I.first_tokens(model, ids).numpy()
    stored = np.array([got.loc[sid, "predicted"][0] for sid in held["sample_id"]])
    assert (after == stored).all()


def test_intervene_rerun_and_multi_token(intervened, tmp_path):
    src, first = intervened
    run = tmp_path / "run"
    shutil.copytree(src, run)
    again = I.intervene(run, k=[1, 2], per_group=3, device="cpu", batch_size=4, seed=0)
    pd.testing.assert_frame_equal(first, again)
    assert all(t["ran"] == 0 for t in read_manifest(run)["intervene"]["tasks"].values())

    multi = I.intervene(run, task="identifiers", k=[1, 8], per_group=3, device="cpu",
                        batch_size=8, seed=0, groups=["positive", "random"], multi_token=True)
    assert set(multi["mode"]) == {"multi_token"} and len(multi) == 4
    assert read_manifest(run)["intervene"]["tasks"]["identifiers"]["ran"] == 4
    works = [p for p in (run / "intervene" / "work").iterdir() if p.name.startswith("identifiers")]
    assert len(works) == 2                                  # first-token and multi-token
    held = max((pd.read_parquet(p / "heldout.parquet") for p in works),
               key=lambda h: h["predicted_before"].map(len).max())
    assert held["predicted_before"].map(len).eq(3).all()
    for _, row in held.iterrows():
        assert row["correct_before"] == (list(row["predicted_before"])
                                         == list(row["target_token_ids"]))
    # k = 8 ablates every head: the model is another function, every judgement may change.
    all_off = multi.set_index(["group", "k"]).loc[("positive", 8)]
    assert all_off["n_heads"] == 8


def test_intervene_bad_input(tmp_path, capsys):
    from apmae_gpu.cli import main

    run = write_intervention_run(tmp_path / "run")
    with pytest.raises(ApmaeError, match="every --k exceeds the model's 8 heads"):
        I.intervene(run, k=[9, 50], device="cpu")
    with pytest.raises(ApmaeError, match="string_literals: no head importance rows"):
        I.intervene(run, task="string_literals", device="cpu")
    with pytest.raises(ApmaeError, match="intervene: groups.1: input should be 'positive'"):
        I.intervene(run, groups=["positive", "biggest"], device="cpu")
    with pytest.raises(SystemExit) as exc:
        main(["intervene", str(run), "--k", "1,two"])
    assert exc.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == (
        "error: --k: input should be a valid integer, unable to parse string as an integer "
        "(got 'two')")
    (run / "classify" / "head_importance.parquet").unlink()
    with pytest.raises(ApmaeError, match="run `apmae classify` first"):
        I.intervene(run, device="cpu")
