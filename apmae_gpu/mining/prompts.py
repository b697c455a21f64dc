"""Prompts of exactly ``window`` tokens around a hole, fitted by the reference loaders'
window rules (the ``Prompts`` section of :mod:`apmae_gpu.mining.tasks` says which rule a split
takes; ``fit_fim_window`` is the rule itself)."""

from __future__ import annotations

from apmae_gpu.capture import llm
from apmae_gpu.core.errors import ApmaeError


class Skip(Exception):
    """A candidate that cannot become a prompt; the message is the counted reason."""


class PromptBuilder:
    """Fit a hole in a text into a prompt of exactly ``window`` tokens (see module doc)."""

    def __init__(self, tokenizer, window: int):
        self.tok = tokenizer
        self.window = window
        self.fim = llm.fim_ids(tokenizer)
        self.budget = window - 3 if self.fim else window
        if self.budget < 8:
            raise ApmaeError(f"--window {window} is too small")

    def _ids(self, text: str, offsets: bool = False):
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=offsets)
        return (enc["input_ids"], enc["offset_mapping"]) if offsets else enc["input_ids"]

    def _left(self, text: str, end: int, need: int) -> tuple[list[int], bool]:
        """Tokens of ``text[:end]`` (at least the last ``need`` exactly), and whether all of
        the prefix was tokenized."""
        span = max(need * 8, 256)
        while True:
            start = max(0, end - span)
            ids = self._ids(text[start:end])
            if start == 0:
                return ids, True
            ids = ids[2:]  # the first tokens at an arbitrary cut may differ from the file's
            if len(ids) >= need:
                return ids, False
            span *= 2

    def _right(self, text: str, start: int, need: int) -> tuple[list[int], bool]:
        span = max(need * 8, 256)
        while True:
            end = min(len(text), start + span)
            ids = self._ids(text[start:end])
            if end == len(text):
                return ids, True
            ids = ids[:-2]
            if len(ids) >= need:
                return ids, False
            span *= 2

    def build(self, text: str, cs: int, ce: int, rule: str = "analysis") -> dict:
        """Prompt for the hole ``text[cs:ce]`` (character offsets); ``rule`` is the split
        whose reference loader fits the window (``train`` or ``analysis``)."""
        if self.fim:
            return self._build_fim(text, cs, ce, rule)
        return self._build_left(text, cs, ce)

    def _build_fim(self, text: str, cs: int, ce: int, rule: str) -> dict:
        pre, suf, mid = self.fim
        left, left_all = self._left(text, cs, self.window)
        right, right_all = self._right(text, ce, self.window)
        middle = self._ids(text[cs:ce])
        if not middle:
            raise Skip("empty_target")
        name, n_left, n_right = fit_fim_window(len(left), len(right), left_all, right_all,
                                               self.window, rule)
        lt, rt = left[len(left) - n_left:], right[:n_right]
        ids = [pre] + lt + [suf] + rt + [mid]
        assert len(ids) == self.window, (len(ids), name)
        return {"input_ids": ids, "target_token_id": middle[0], "target_token_ids": middle,
                "fim": True, "window_rule": name, "n_left": len(lt), "n_right": len(rt)}

    def _build_left(self, text: str, cs: int, ce: int) -> dict:
        w = self.window
        # Tokenize the file from well before the hole to just past the target, with offsets,
        # so the token at the hole is the file's own token there.
        span = max(w * 8, 256)
        while True:
            start = max(0, cs - span)
            stop = min(len(text), ce + 16)
            ids, offs = self._ids(text[start:stop], offsets=True)
            first = 0 if start == 0 else 2
            t = next((i for i in range(first, len(ids)) if offs[i][1] + start > cs), None)
            if t is None:
                raise Skip("empty_target")
            if t - first >= w or start == 0:
                break
            span *= 2
        if t - first < w:
            raise Skip("too_short")
        tok_start = offs[t][0] + start
        if tok_start < cs and text[tok_start:cs].strip():
            raise Skip("boundary_merge")  # the hole's token starts inside the left context
        u = t
        while u < len(ids) and offs[u][0] + start < ce:
            u += 1
        return {"input_ids": ids[t - w:t], "target_token_id": ids[t],
                "target_token_ids": ids[t:max(u, t + 1)], "fim": False, "window_rule": "left",
                "n_left": w, "n_right": 0}


def fit_fim_window(n_left: int, n_right: int, left_all: bool, right_all: bool, window: int,
                   rule: str) -> tuple[str, int, int]:
    """The reference loaders' window over ``<fim_prefix>`` left ``<fim_suffix>`` right
    ``<fim_middle>``: (rule name, left tokens kept, right tokens kept), or :class:`Skip`.

    ``n_left``/``n_right`` tokens are available (all of them where ``*_all``).  Both loaders
    drop prompts shorter than the window; a hole at most ``window/2`` tokens from the start
    keeps the file's first ``window - 2`` tokens of left + ``<fim_suffix>`` + right
    (``head``; the reference writes ``<fim_prefix>`` twice there and so keeps one token
    less: a defect we do not copy).  Otherwise the training loader keeps up to
    ``(window-2)/2 - 1`` right tokens and fills with the nearest left ones (``tail``); the
    analysis loader keeps a centred ``(window-2)/2`` left / ``(window-2)/2 - 1`` right window
    and drops holes with fewer right tokens (``centre``; ``short_right``)."""
    budget = window - 3
    fits = left_all and right_all and n_left + n_right == budget
    if left_all and right_all and n_left + n_right < budget:
        raise Skip("too_short")
    if left_all and n_left <= window // 2:
        return ("whole" if fits else "head"), n_left, budget - n_left
    keep_right = (window - 2) // 2 - 1
    if rule == "analysis":
        if n_right < keep_right:
            raise Skip("short_right")
        return "centre", budget - keep_right, keep_right
    r = min(n_right, keep_right)
    return ("whole" if fits else "tail"), budget - r, r
