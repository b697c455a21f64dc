"""Mining: find the 11 completion tasks in real Java files with tree-sitter and turn each
into a prompt of exactly ``window`` tokens.

Targets come from the syntax tree, never from regular expressions over raw text, so an
operator or bracket inside a comment or a string literal is never a target:

==========================  ===============================================================
identifiers                 ``identifier`` nodes (``type_identifier`` too with
                            ``type_identifiers=True``; the reference takes identifiers only)
boolean_literals            ``true`` / ``false`` nodes
string_literals             ``string_literal`` (text blocks too) / ``character_literal``
numeric_literals            decimal, hex, octal, binary integer and floating point literals
boolean_operators           operator field ``==`` ``!=`` ``&&`` ``||`` (binary), ``!`` (unary)
mathematical_operators      ``+ - * / %`` ``< > <= >=`` (binary), ``+ -`` (unary),
                            ``++ --`` (update expressions)
assignment_operators        operator field of assignment expressions, compound ones only
closing_brackets            ``}`` ``)`` ``]`` tokens
end_of_line                 a ``;`` token and its line break (spaces/tabs allowed between): the
                            hole is ``;\n`` (``;\r\n``) as the reference mines it, so the
                            right context starts on the next line
random_masking              a span of 3-10 tokens at a random place
noise                       tokens drawn uniformly from the vocabulary (special tokens
                            excluded); with FIM tokens the reference's layout: ``<fim_prefix>``
                            first, ``<fim_suffix>`` at a random inner position,
                            ``<fim_middle>`` last
==========================  ===============================================================

Prompts
    FIM (``<fim_prefix>`` left ``<fim_suffix>`` right ``<fim_middle>``) when the tokenizer has
    the three tokens; the left, right and middle texts are tokenized as segments, exactly as
    they are inside the prompt (special tokens split the text).  The window is fitted by the
    reference's loader for the prompt's split (``prompts.fit_fim_window``, ``window_rule``):
    ``whole`` if everything fits exactly; ``head`` if the hole lies within the window's first
    half (keep the file's first tokens); else for training prompts ``tail`` (keep up to
    ``(window-2)/2 - 1`` tokens right of the hole and fill the rest with the nearest left
    tokens) and for analysis prompts ``centre`` (``(window-2)/2`` left and ``(window-2)/2 - 1``
    right tokens; a hole with fewer right tokens is dropped, as the reference's analysis
    loader drops it).  Without FIM tokens: ``left``, the ``window`` tokens just before the
    hole.  The target's first token is the token the model must produce next *in that
    prompt*: for ``left`` the file's own tokenization at the hole (a leading space becomes
    part of the target token, as in the file); for FIM the first token of the middle segment.
    Files too short for a full window are skipped and counted.  A file with parse errors
    loses only the syntax targets inside or touching an ERROR/MISSING node (random spans need
    no parse).

Quotas
    Pass after pass over the corpus, every file gives up to ``per_file`` new holes per task
    that still needs rows (a per-file cursor over its seeded order of holes, so no hole is
    taken twice), until every quota is met or a pass adds nothing.

Splits (``split`` column)
    AP-MAE's training prompts (``train``: random masking) and the analysis prompts
    (``analysis``: every task) never come from the same source file.  With one corpus, each
    file goes whole to the split that is further from its quota (in the corpus' seeded
    order); with ``train_corpus`` (e.g. StackLessV2's ``train`` split while ``corpus`` is its
    ``test`` split, as the reference) the training prompts come from that corpus, and a file
    whose bytes are already in the analysis split is skipped as a duplicate.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import tree_sitter as ts
import tree_sitter_java as tsj

from apmae_gpu import TASKS, task_rank
from apmae_gpu.capture import llm
from apmae_gpu.core import layout
from apmae_gpu.core.config import CaptureConfig, InterveneConfig, MineConfig, mine_supply, section
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import update_manifest, write_parquet
from apmae_gpu.core.layout import check_mine_out
from apmae_gpu.core.logs import progress
from apmae_gpu.mining.corpus import TooLarge, Unreadable, open_corpus, resolve_corpus
from apmae_gpu.mining.prompts import PromptBuilder, Skip

log = logging.getLogger("apmae_gpu.mining.tasks")

SYNTAX_TASKS = TASKS[:9]

_QUERY = """
(identifier) @identifiers
(true) @boolean_literals
(false) @boolean_literals
(string_literal) @string_literals
(character_literal) @string_literals
(decimal_integer_literal) @numeric_literals
(hex_integer_literal) @numeric_literals
(octal_integer_literal) @numeric_literals
(binary_integer_literal) @numeric_literals
(decimal_floating_point_literal) @numeric_literals
(hex_floating_point_literal) @numeric_literals
(binary_expression operator: _ @binary_op)
(unary_expression operator: _ @unary_op)
(update_expression ["++" "--"] @update_op)
(assignment_expression operator: _ @assignment_op)
"}" @closing_brackets
")" @closing_brackets
"]" @closing_brackets
";" @end_of_line
"""

BOOLEAN_BINARY = {"==", "!=", "&&", "||"}
BOOLEAN_UNARY = {"!"}
MATH_BINARY = {"+", "-", "*", "/", "%", "<", ">", "<=", ">="}
MATH_UNARY = {"+", "-"}
COMPOUND_ASSIGNMENT = {"+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "<<=", ">>=", ">>>="}

TASKS_SCHEMA = pa.schema([
    ("task_id", pa.int64()), ("task", pa.string()), ("source", pa.string()),
    ("start_byte", pa.int64()), ("end_byte", pa.int64()), ("target", pa.string()),
    ("kind", pa.string()), ("input_ids", pa.list_(pa.int32())), ("target_token_id", pa.int64()),
    ("target_token_ids", pa.list_(pa.int32())), ("fim", pa.bool_()), ("window_rule", pa.string()),
    ("n_left", pa.int32()), ("n_right", pa.int32()), ("file_sha256", pa.string()),
    ("split", pa.string()),
])
SPLITS = ("train", "analysis")


@dataclass(frozen=True)
class Target:
    task: str
    start_byte: int
    end_byte: int
    kind: str


def parse_tasks(tasks: str) -> list[str]:
    if tasks.strip() == "all":
        return list(TASKS)
    chosen = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in TASKS]
    if unknown or not chosen:
        raise ApmaeError(f"unknown task {', '.join(unknown) or repr(tasks)}; known: "
                         f"{', '.join(TASKS)}")
    return [t for t in TASKS if t in chosen]


# --------------------------------------------------------------------------- syntax
class JavaTargets:
    """tree-sitter parser and query for the nine syntax tasks."""

    def __init__(self, type_identifiers: bool = False):
        self.language = ts.Language(tsj.language())
        self.parser = ts.Parser(self.language)
        query = _QUERY + ("(type_identifier) @identifiers\n" if type_identifiers else "")
        self.query = ts.Query(self.language, query)
        self.cursor = ts.QueryCursor(self.query)

    def parse(self, data: bytes):
        return self.parser.parse(data)

    def find(self, tree, data: bytes) -> dict[str, list[Target]]:
        """Every target of the nine syntax tasks in one parsed file."""
        out: dict[str, list[Target]] = {t: [] for t in SYNTAX_TASKS}
        for name, nodes in self.cursor.captures(tree.root_node).items():
            for node in nodes:
                if node.has_error or node.is_missing:
                    continue
                text = node.text.decode("utf-8", errors="replace") if node.text else ""
                task = _classify_capture(name, text, node, data)
                if task is None:
                    continue
                end = _line_break_end(node.end_byte, data) if task == "end_of_line" else node.end_byte
                out[task].append(Target(task, node.start_byte, end,
                                        node.type if name in SYNTAX_TASKS else f"{name}:{text}"))
        for targets in out.values():
            targets.sort(key=lambda t: (t.start_byte, t.end_byte))
        return out


def _classify_capture(name: str, text: str, node, data: bytes) -> str | None:
    if name in ("identifiers", "boolean_literals", "string_literals", "numeric_literals",
                "closing_brackets"):
        return name
    if name == "end_of_line":
        return "end_of_line" if _line_break_end(node.end_byte, data) is not None else None
    if name == "binary_op":
        if text in BOOLEAN_BINARY:
            return "boolean_operators"
        return "mathematical_operators" if text in MATH_BINARY else None
    if name == "unary_op":
        if text in BOOLEAN_UNARY:
            return "boolean_operators"
        return "mathematical_operators" if text in MATH_UNARY else None
    if name == "update_op":
        return "mathematical_operators"
    if name == "assignment_op":
        return "assignment_operators" if text in COMPOUND_ASSIGNMENT else None
    return None


def _line_break_end(i: int, data: bytes) -> int | None:
    """The byte just past the line break that follows ``data[i:]`` after spaces/tabs
    (``\n``, ``\r\n`` or ``\r``), or None when the line goes on."""
    while i < len(data) and data[i] in b" \t":
        i += 1
    if i >= len(data) or data[i] not in b"\r\n":
        return None
    if data[i:i + 2] == b"\r\n":
        return i + 2
    return i + 1


def char_offsets(data: bytes):
    """A function mapping UTF-8 byte offsets of ``data`` to character offsets."""
    if data.isascii():
        return lambda b: b
    arr = np.frombuffer(data, dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum((arr & 0xC0) != 0x80)])
    return lambda b: int(starts[b])


# --------------------------------------------------------------------------- the stage
def _rng(seed: int, *parts) -> np.random.Generator:
    digest = hashlib.blake2b("\0".join(map(str, (seed,) + parts)).encode(), digest_size=8)
    return np.random.default_rng(int.from_bytes(digest.digest(), "little"))


def _file_skip_reason(data: bytes, max_file_bytes: int) -> str | None:
    if isinstance(data, Unreadable):   # symlink loop, special file, corrupt zip member, ...
        return data.reason
    if isinstance(data, TooLarge) or len(data) > max_file_bytes:
        return "huge"
    if not data.strip():
        return "empty"
    if b"\0" in data[:8192]:
        return "binary"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "non_utf8"
    return None


MAX_DEPTH = 1000   # syntax tree depth; hand-written Java stays far below it


def too_deep(root, limit: int = MAX_DEPTH) -> bool:
    """Whether the tree is deeper than ``limit``.  tree-sitter's query captures take time
    growing with the square of the nesting depth (one 1 MB expression: minutes), and its
    progress callback cannot stop them here, so such files are skipped before the query.
    A subtree of at most ``limit - depth`` nodes cannot reach the limit and is not walked:
    the walk stays far below the parse's cost (measured in ``docs/fidelity.md``)."""
    stack = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if node.descendant_count > limit - depth:
            stack.extend((child, depth + 1) for child in node.children)
    return False


def mine_file(source: str, data: bytes, need: set[str], java: JavaTargets,
              builder: PromptBuilder, seed: int, per_file: int, skips: Counter,
              split: str = "analysis", visit: int = 0, cursor: dict | None = None) -> list[dict]:
    """Up to ``per_file`` prompts per needed task from one file (rows without ``task_id``),
    fitted by ``split``'s window rule.  ``visit`` counts the passes over this file; with a
    ``cursor`` (candidates already tried, per task) a further visit never takes a hole again.
    Candidates inside or touching a parse error are dropped; random spans need no parse."""
    text = data.decode("utf-8")
    to_char = char_offsets(data)
    sha = hashlib.sha256(data).hexdigest()
    syntax = need & set(SYNTAX_TASKS)
    found, errors = _parse(java, data, skips, count=visit == 0) if syntax else ({}, [])
    cursor = {} if cursor is None else cursor
    rows = []
    for task in TASKS:
        if task not in need or task == "noise":
            continue
        if task == "random_masking":
            candidates = _random_spans(text, data, builder, _rng(seed, task, source, visit),
                                       per_file * 4)
        else:
            targets = found.get(task, [])
            order = _rng(seed, task, source).permutation(len(targets))
            start = cursor.get(task, 0)
            candidates = [targets[i] for i in order[start:start + per_file * 4]]
        got = 0
        for target in candidates:
            cursor[task] = cursor.get(task, 0) + 1
            if _touches(target, errors):
                skips["parse_error"] += 1
                continue
            try:
                prompt = builder.build(text, to_char(target.start_byte), to_char(target.end_byte),
                                       rule=split)
            except Skip as why:
                skips[str(why)] += 1
                continue
            rows.append({"task": task, "source": source, "start_byte": target.start_byte,
                         "end_byte": target.end_byte,
                         "target": data[target.start_byte:target.end_byte].decode("utf-8"),
                         "kind": target.kind, "file_sha256": sha, **prompt})
            got += 1
            if got >= per_file:
                break
    return rows


def _parse(java: JavaTargets, data: bytes, skips: Counter, count: bool):
    """The syntax targets of a file and the byte spans of its parse errors (ERROR and
    MISSING nodes); a file with errors is counted once as ``unparsable``.  A file whose
    tree is too deep for tree-sitter's query (:func:`too_deep`) yields no syntax targets and
    is counted once as ``too_deep`` (random spans need no query)."""
    tree = java.parse(data)
    if too_deep(tree.root_node):
        if count:
            skips["too_deep"] += 1
        return {}, []
    errors = error_spans(tree.root_node)
    if errors and count:
        skips["unparsable"] += 1
    return java.find(tree, data), errors


def error_spans(root) -> list[tuple[int, int]]:
    """(start, end) bytes of every ERROR or MISSING node, descending only where errors are."""
    out, stack = [], [root] if root.has_error else []
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            out.append((node.start_byte, node.end_byte))
            continue
        stack.extend(c for c in node.children if c.has_error or c.is_missing)
    return sorted(out)


def _touches(target: Target, errors: list[tuple[int, int]]) -> bool:
    """Whether a syntax target overlaps or touches a parse error (random spans never do)."""
    if target.task == "random_masking":
        return False
    return any(s <= target.end_byte and target.start_byte <= e for s, e in errors)


def _random_spans(text: str, data: bytes, builder: PromptBuilder, rng, n: int) -> list[Target]:
    """``n`` random spans of 3-10 tokens (token boundaries of the file's own tokenization)."""
    if len(text) < 64:
        return []
    out = []
    for _ in range(n):
        pos = int(rng.integers(0, len(text)))
        lo = max(0, pos - 64)
        ids, offs = builder._ids(text[lo:pos + 512], offsets=True)
        first = 0 if lo == 0 else 2
        starts = [i for i in range(first, len(ids)) if offs[i][0] + lo >= pos]
        length = int(rng.integers(3, 11))
        if not starts or starts[0] + length >= len(ids) - 2:
            continue
        i = starts[0]
        cs, ce = offs[i][0] + lo, offs[i + length - 1][1] + lo
        # Skip leading whitespace so the span starts on a visible character.
        while cs < ce and text[cs].isspace():
            cs += 1
        if ce - cs < 1:
            continue
        b0 = len(text[:cs].encode("utf-8"))
        b1 = b0 + len(text[cs:ce].encode("utf-8"))
        out.append(Target("random_masking", b0, b1, f"span:{length}"))
    return out


def noise_rows(tokenizer, window: int, n: int, seed: int) -> list[dict]:
    """``n`` prompts of tokens drawn uniformly from the vocabulary (special tokens excluded).
    With FIM tokens, the reference's layout: ``<fim_prefix>`` at 0, ``<fim_suffix>`` at a
    random inner position, ``<fim_middle>`` last."""
    vocab = len(tokenizer)
    special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    allowed = np.setdiff1d(np.arange(vocab), special)
    fim = llm.fim_ids(tokenizer)
    rows = []
    for i in range(n):
        rng = _rng(seed, "noise", i)
        ids = rng.choice(allowed, size=window, replace=True).astype(int)
        n_left, n_right = window, 0
        if fim:
            pre, suf, mid = fim
            at = int(rng.integers(1, window - 1))      # an inner position: 1 .. window - 2
            ids[0], ids[at], ids[-1] = pre, suf, mid
            n_left, n_right = at - 1, window - 2 - at
        rows.append({"task": "noise", "source": "noise", "start_byte": -1, "end_byte": -1,
                     "target": "", "kind": "uniform", "file_sha256": "",
                     "input_ids": ids.tolist(), "target_token_id": -1,
                     "target_token_ids": [], "fim": bool(fim), "window_rule": "noise",
                     "n_left": n_left, "n_right": n_right, "split": "analysis"})
    return rows


class _Quotas:
    """Rows still wanted per split: ``train`` (random masking for AP-MAE) and ``analysis``
    (every mined task), and which split the next file of a corpus goes to."""

    def __init__(self, analysis: dict[str, int], train: int):
        self.quota = {"analysis": {t: q for t, q in analysis.items() if t != "noise"},
                      "train": {"random_masking": train} if train > 0 else {}}
        self.counts = {split: Counter() for split in SPLITS}

    def need(self, split: str) -> set[str]:
        return {t for t, q in self.quota[split].items() if self.counts[split][t] < q}

    def _fill(self, split: str) -> float:
        q = self.quota[split]
        return sum(min(self.counts[split][t], n) for t, n in q.items()) / max(1, sum(q.values()))

    def pick(self, mode: str) -> str | None:
        """The split of the next file: ``mode`` itself, or with ``both`` the open split that
        is further from its quota (analysis on a tie); None when nothing is wanted."""
        open_ = [s for s in (SPLITS if mode == "both" else (mode,)) if self.need(s)]
        if len(open_) < 2:
            return open_[0] if open_ else None
        return "train" if self._fill("train") < self._fill("analysis") else "analysis"

    def take(self, split: str, task: str) -> bool:
        if self.counts[split][task] >= self.quota[split].get(task, 0):
            return False
        self.counts[split][task] += 1
        return True

    def missing(self, split: str) -> dict[str, int]:
        return {t: q - self.counts[split][t] for t, q in self.quota[split].items()
                if self.counts[split][t] < q}


class _Reader:
    """The corpora's files, visited pass after pass: the first pass gives each new file a
    split (skipping bad and duplicate files), later passes revisit the files that have one
    while their split still needs rows, each with its candidate cursor (no hole twice)."""

    def __init__(self, passes, quotas: _Quotas, seed: int, max_files, max_file_bytes: int,
                 dedup: bool):
        self.passes, self.quotas, self.seed, self.max_files = passes, quotas, seed, max_files
        self.max_file_bytes, self.dedup = max_file_bytes, dedup
        self.split_of: dict[tuple[int, str], str] = {}
        self.cursors: dict[tuple[int, str], dict] = {}
        self.seen: set[bytes] = set()
        self.n_files = 0

    def files(self, visit: int, skips: Counter):
        """(source, data, split, cursor) of the files to mine in pass ``visit``."""
        for c, (corpus_obj, mode) in enumerate(self.passes):
            n_read = 0
            for source, data in corpus_obj.iter_files(seed=self.seed,
                                                      max_bytes=self.max_file_bytes):
                if visit == 0:
                    split = self.quotas.pick(mode)
                    if split is None or (self.max_files is not None and n_read >= self.max_files):
                        break
                    n_read += 1
                    if not self._admit(data, skips):
                        continue
                    self.split_of[(c, source)] = split
                else:
                    split = self.split_of.get((c, source))
                    if split is None or not self.quotas.need(split):
                        continue
                yield source, data, split, self.cursors.setdefault((c, source), {})
            self.n_files += n_read

    def _admit(self, data: bytes, skips: Counter) -> bool:
        reason = _file_skip_reason(data, self.max_file_bytes)
        if reason:
            skips[reason] += 1
            return False
        if self.dedup:   # a file in both corpora stays in the analysis split
            digest = hashlib.sha256(data).digest()
            if digest in self.seen:
                skips["duplicate"] += 1
                return False
            self.seen.add(digest)
        return True


def _warn_short(quotas: _Quotas, passes: int, n_files: int, capped: bool) -> None:
    """One line per task that did not reach its quota: how far it got and why."""
    why = f"--max-passes {passes} reached" if capped else "corpus exhausted"
    for split in SPLITS:
        for task, n in quotas.missing(split).items():
            q = quotas.quota[split][task]
            log.warning("mine: %s (%s): %d of %d rows, %s after %d pass(es) over %d files",
                        task, split, q - n, q, why, passes, n_files)


def mine(out: Path, settings: MineConfig | None = None, *, model: str, seed: int = 0,
         trust_remote_code: bool = False, capture: CaptureConfig | None = None,
         intervene: InterveneConfig | None = None, **overrides) -> pd.DataFrame:
    """Mine ``per_task`` analysis prompts per task (``per_task_overrides`` for some tasks;
    without ``per_task``, the supply :func:`~apmae_gpu.core.config.mine_supply` derives from the
    ``capture`` and ``intervene`` sections, default the paper's) and
    ``train_per_task`` random-masking prompts for AP-MAE from other files (or from
    ``train_corpus``) into ``out/tasks.parquet`` (+ manifest section).  ``max_files`` bounds
    the files read from each corpus.

    Pass after pass over the corpus (up to ``max_passes``), each file gives up to
    ``per_file`` more new holes per task still wanted; a task still short when a pass adds
    nothing (corpus exhausted) gets one warning line.

    ``settings``: the ``mine`` section (:class:`~apmae_gpu.core.config.MineConfig`; default the
    paper's), with keyword ``overrides`` of its fields over it; ``model`` gives the
    tokenizer."""
    cfg = section(MineConfig, settings, overrides)
    check_mine_out(out)   # before any work: a file, read-only, or a run with captures
    corpus = resolve_corpus(cfg.corpus)
    train_corpus = resolve_corpus(cfg.train_corpus) if cfg.train_corpus else None
    per_task, n_noise = mine_supply(cfg, capture, intervene)
    tasks, window, per_file = cfg.tasks, cfg.window, cfg.per_file
    dedup, max_files, max_file_bytes = cfg.dedup, cfg.max_files, cfg.max_file_bytes
    content_column, type_identifiers = cfg.content_column, cfg.type_identifiers
    train_per_task = cfg.train_per_task
    chosen = parse_tasks(tasks)
    quota_of = dict(cfg.per_task_overrides)
    unknown = sorted(set(quota_of) - set(TASKS))
    if unknown:
        raise ApmaeError(f"per-task override for unknown task {', '.join(unknown)}")
    quota = {t: int(quota_of.get(t, n_noise if t == "noise" else per_task)) for t in chosen}
    quotas = _Quotas(quota, int(train_per_task) if "random_masking" in chosen else 0)
    src = open_corpus(corpus, content_column, cfg.dedup_flags)
    passes = [(src, "both")]
    if train_corpus:
        passes = [(src, "analysis"),
                  (open_corpus(train_corpus, content_column, cfg.dedup_flags), "train")]
    tokenizer = llm.load_tokenizer(model, trust_remote_code=trust_remote_code)
    builder = PromptBuilder(tokenizer, window)
    java = JavaTargets(type_identifiers=type_identifiers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    skips: Counter = Counter()
    files: Counter = Counter()
    rows: list[dict] = []
    total = sum(sum(q.values()) for q in quotas.quota.values())
    bar = progress(total=total, desc="mine", unit="task")
    reader = _Reader(passes, quotas, seed, max_files, max_file_bytes, dedup or bool(train_corpus))
    visits = 0
    for visit in range(cfg.max_passes):
        added, visits = 0, visit + 1
        for source, data, split, cursor in reader.files(visit, skips):
            files[split] += visit == 0
            for row in mine_file(source, data, quotas.need(split), java, builder, seed,
                                 per_file, skips, split=split, visit=visit, cursor=cursor):
                if quotas.take(split, row["task"]):
                    rows.append({**row, "split": split})
                    bar.update(1)
                    added += 1
        if added == 0 or not (quotas.need("analysis") or quotas.need("train")):
            break
    n_files = reader.n_files
    bar.close()
    counts = Counter(quotas.counts["analysis"])
    # an empty corpus and one of unusable files end alike (noise alone needs no corpus)
    if not rows and set(chosen) - {"noise"}:
        raise ApmaeError(f"no task could be mined from {corpus} (files read: {n_files}, "
                         f"skipped: {dict(skips)})")
    if "noise" in chosen:
        rows += noise_rows(tokenizer, window, quota["noise"], seed)
        counts["noise"] = quota["noise"]
    if not rows:
        raise ApmaeError(f"no task could be mined from {corpus} (files read: {n_files}, "
                         f"skipped: {dict(skips)})")
    df = pd.DataFrame(rows).sort_values("task", kind="stable", key=task_rank).reset_index(drop=True)
    df.insert(0, "task_id", np.arange(len(df), dtype=np.int64))
    df = df[[f.name for f in TASKS_SCHEMA]]
    write_parquet(df, out / layout.TASKS_PARQUET, schema=TASKS_SCHEMA)
    seconds = time.perf_counter() - t0
    short = quotas.missing("analysis")
    short_train = quotas.missing("train")
    _warn_short(quotas, visits, n_files, visits >= cfg.max_passes)
    record = {
        "corpus": src.describe(), "model": llm.resolve(model).describe(),
        "train_corpus": passes[-1][0].describe() if train_corpus else None,
        "tokenizer_vocab": len(tokenizer), "fim": builder.fim is not None,
        "tasks": chosen, "per_task": per_task, "quotas": quota, "per_file": per_file,
        "train_per_task": quotas.quota["train"].get("random_masking", 0),
        "type_identifiers": type_identifiers, "window": window,
        "seed": seed, "dedup": dedup, "files_read": n_files, "counts": dict(counts),
        "train_counts": dict(quotas.counts["train"]), "files_per_split": dict(files),
        "missing": short, "missing_train": short_train, "skipped": dict(skips),
        "passes": visits, "max_passes": cfg.max_passes, "rarer_share": cfg.rarer_share,
        "window_rules": df["window_rule"].value_counts().to_dict(),
        "seconds": round(seconds, 2), "tasks_per_second": round(len(df) / max(seconds, 1e-9), 1),
    }
    update_manifest(out, "mine", record)
    log.info("mined %d tasks (%d for AP-MAE training) from %d files in %.1fs (%.1f tasks/s) -> %s",
             len(df), int((df["split"] == "train").sum()), n_files, seconds,
             len(df) / max(seconds, 1e-9), out / layout.TASKS_PARQUET)
    return df
