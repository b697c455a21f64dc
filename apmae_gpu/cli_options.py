"""The stage commands' options, from the config models: one source per setting.

Every option that is a stage setting takes its default and bounds from the setting's field in
:mod:`apmae_gpu.core.config` (:func:`opt`), and the command builds the stage's config section from
its options (:func:`section_from`): a setting is written once, in its config model.
``--config FILE`` takes a command's settings (and seed, device) from a pipeline config;
options given on the command line override it.  tests/test_cli_settings.py compares every
option with its field.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import BaseModel, ValidationError

from apmae_gpu.core.config import (
    SECTION_OF,
    CaptureSplitConfig,
    M,
    PipelineConfig,
    load_config,
    message,
)
from apmae_gpu.core.errors import ApmaeError


def split_csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="Take this command's settings (and --seed, --device) from a pipeline "
    "config's section; options given on the command line override it.")]


def bounds(info) -> dict:
    """click's min/max for a field's closed bounds (open bounds are checked by the model)."""
    out = {}
    for meta in info.metadata:
        if getattr(meta, "ge", None) is not None:
            out["min"] = meta.ge
        if getattr(meta, "le", None) is not None:
            out["max"] = meta.le
    return out


def describe_field(info) -> str:
    """A field's description as option help: its first letter upper-case, a final period."""
    text = (info.description or "").strip()
    if text:
        text = text[0].upper() + text[1:]
        if not text.endswith((".", "?", "!", ")")):
            text += "."
    return text


def opt(model: type[BaseModel], name: str, *decls: str, help: str | None = None, **kw):
    """A typer option for the setting ``model.name``: the field's default (a list as a comma
    list) and bounds, and its description unless ``help`` is given."""
    info = model.model_fields[name]
    default = info.get_default(call_default_factory=True)
    if isinstance(default, (list, tuple)):
        default = ",".join(map(str, default))
    text = help if help is not None else describe_field(info)
    return typer.Option(default, *decls, help=text, **bounds(info), **kw)


def pipeline_config(path: Path | None) -> PipelineConfig | None:
    return load_config(path) if path is not None else None


def given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def top(ctx: typer.Context, cfg: PipelineConfig | None, name: str, value):
    """A run-wide setting (seed, device, model, trust_remote_code): the option when given,
    else the config's when there is one, else the option's default."""
    if cfg is not None and not given(ctx, name):
        return getattr(cfg, name)
    return value


def section_from(ctx: typer.Context, model: type[M], values: dict, cfg: PipelineConfig | None,
              split: str | None = None) -> M:
    """The config section ``model`` from a command's options: the pipeline config's section
    (or the model's defaults) with the options given over it.  A comma-list option fills a
    list field; a bad value is a one-line error naming the option."""
    base = getattr(cfg, SECTION_OF[model]) if cfg is not None else None
    data = (base if base is not None else model()).model_dump()
    flags = {}
    for param in ctx.command.params:
        field = param.name
        of_split = split is not None and field in SPLIT_FIELDS
        fields = CaptureSplitConfig.model_fields if of_split else model.model_fields
        if field not in fields or param.name not in values:
            continue
        value = values[param.name]
        if (base is not None or value is None) and not given(ctx, param.name):
            continue
        if isinstance(value, str) and is_list(fields[field].annotation):
            value = split_csv(value)
        (data[split] if of_split else data)[field] = value
        flags[field] = param.opts[0]
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        key = loc[1] if split and loc[:1] == [split] and len(loc) > 1 else "".join(loc[:1])
        got = err.get("input")
        shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        raise ApmaeError(f"{flags.get(key, key)}: {message(err)}{shown}") from None


SPLIT_FIELDS = ("per_task", "heads", "max_attempts")


def without(values: dict, *names: str) -> dict:
    return {k: v for k, v in values.items() if k not in names}


def is_list(annotation) -> bool:
    """Whether a field holds a list (also inside Optional)."""
    if typing.get_origin(annotation) is list:
        return True
    return any(is_list(a) for a in typing.get_args(annotation))


_VARIADIC = {"evaluate": ("--checkpoint", "--data")}


def expand_variadic(argv: list[str]) -> list[str]:
    """Let ``--checkpoint A B --data X Y`` mean ``--checkpoint A --checkpoint B ...`` (click
    options take one value each)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    names = _VARIADIC.get(command or "", ())
    if not names:
        return argv
    out: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg.startswith("-"):
            current = arg if arg in names else None
            if current is None:
                out.append(arg)
            continue
        if current is not None:
            out += [current, arg]
        else:
            out.append(arg)
    return out
