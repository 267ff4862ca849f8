"""``--help`` of every app, generated from its schema and its root config.

Hydra's own help page lists every group in ``conf/`` (the pipeline's sweeps in stage one too) and
no key. Each root config sets ``hydra.help.template: ${repopt_help:<app>}`` instead, and this
module writes the page from what the app really reads:

* the root config's leading comment (what the app does, example commands);
* the groups its defaults list names, each with the options found in ``conf/<group>/``;
* every key of its schema dataclass, with its type, default and the comment beside the field
  (the dataclass is the one place a default and its meaning live; the YAML files only choose).

Nothing here imports torch: the page must come up at once.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

from omegaconf import OmegaConf

# app -> (its root config in conf/, "module:Class" of its schema, the command that runs it)
APPS: dict[str, tuple[str, str, str]] = {
    "hypersearch": ("hypersearch", "hypersearch.config:HSConfig", "python -m hypersearch"),
    "target_train": ("target_train", "target_train.config:TargetConfig", "python -m target_train"),
    "search_and_train": ("search_and_train", "pipelines.config:PipelineConfig", "python -m pipelines.search_and_train"),
    "export": ("export", "target_train.step_config:ExportConfig", "python -m target_train.export"),
    "prune": ("prune", "target_train.step_config:PruneConfig", "python -m target_train.prune"),
    "qat": ("qat", "target_train.step_config:QatConfig", "python -m target_train.qat"),
    "tune": ("tune", "pipelines.tune.config:TuneConfig", "python -m pipelines.tune"),
}


@dataclass(frozen=True)
class Key:
    """One setting as the user types it: ``optim.lr``, its type, default and meaning."""

    path: str
    type: str
    default: str
    doc: str


def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comments written on its statement's lines (beside the default, or inside it
    where the formatter wrapped a long line) and any comment lines right above it, for ``cls`` and its
    dataclass bases (a subclass's comment wins)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        line_comment = {
            tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT
        }
        body = ast.parse(source).body[0].body
        previous_end = body[0].lineno - 1 if body else 0
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                above = [line_comment[n] for n in range(previous_end + 1, node.lineno) if n in line_comment]
                inside = [line_comment[n] for n in range(node.lineno, node.end_lineno + 1) if n in line_comment]
                doc = " ".join(p for p in (*above, *inside) if p)
                if doc:
                    comments[node.target.id] = doc
            previous_end = node.end_lineno
    return comments


def _type_name(kind) -> str:
    if kind in (int, float, str, bool):
        return kind.__name__
    origin = typing.get_origin(kind)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:
        return _type_name(args[0]) + " | null"
    if origin in (list, tuple):
        return f"list[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    if origin is dict:
        return "map"
    if origin is typing.Union:
        return " | ".join(_type_name(a) for a in args)
    return getattr(kind, "__name__", str(kind))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return ""
    return "null" if value is None else OmegaConf.to_yaml({"v": value}).partition(":")[2].strip().replace("\n", " ")


def schema_keys(cls: type, prefix: str = "") -> list[Key]:
    """Every leaf key of a schema dataclass, nested dataclasses expanded (``optim.lr``), in field order."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    keys: list[Key] = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        nested = kind if dataclasses.is_dataclass(kind) else None
        if nested is None:
            args = [a for a in typing.get_args(kind) if dataclasses.is_dataclass(a)]
            nested = args[0] if len(args) == 1 and typing.get_origin(kind) is typing.Union else None
        if nested is not None:
            keys.extend(schema_keys(nested, f"{prefix}{f.name}."))
        else:
            keys.append(Key(prefix + f.name, _type_name(kind), _default_text(f), comments.get(f.name, "")))
    return keys


def _schema(app: str) -> type:
    module, _, name = APPS[app][1].partition(":")
    return getattr(importlib.import_module(module), name)


def _conf_text(name: str) -> str:
    return (files("repopt.conf") / f"{name}.yaml").read_text()


def _intro(text: str) -> list[str]:
    """The root config's leading comment block, without the '#'."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("# @package"):
            continue
        lines.append(line[1:].removeprefix(" ").rstrip())
    return lines


def _groups(text: str) -> list[tuple[str, str, str]]:
    """(group, where it lands, default option) for every group the root config's defaults list names."""
    node = OmegaConf.create(text)
    out = []
    for entry in node.get("defaults", []):
        if not OmegaConf.is_dict(entry) and not isinstance(entry, dict):
            continue
        for key in entry:
            if str(key).startswith("override"):
                continue
            raw = OmegaConf.to_container(entry, resolve=False)[key]
            group, _, package = str(key).lstrip("/").partition("@")
            out.append((group, package or group, "none" if raw is None else str(raw)))
    return out


def _options(group: str) -> list[str]:
    folder = files("repopt.conf") / group
    try:
        return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
    except (FileNotFoundError, NotADirectoryError):
        return []


def group_lines(app: str) -> list[str]:
    lines = []
    for group, package, default in _groups(_conf_text(APPS[app][0])):
        chooser = group if package == group else f"{group}@{package}"
        lines.append(f"  {chooser}={default}".ljust(34) + "  options: " + ", ".join(_options(group)))
    return lines


@lru_cache(maxsize=None)
def app_help(app: str) -> str:
    """The whole ``--help`` page of ``app`` (one of ``APPS``)."""
    if app not in APPS:
        raise KeyError(f"no help for {app!r}; known apps: {', '.join(APPS)}")
    root, _, command = APPS[app]
    keys = schema_keys(_schema(app))
    width = min(max(len(f"{k.path}={k.default}") for k in keys) + 2, 46)
    out = [
        *_intro(_conf_text(root)),
        "",
        f"Usage: {command} [KEY=VALUE ...] [GROUP=OPTION ...]     (-m: a sweep over comma-separated values)",
        "",
        "Groups (GROUP=OPTION; a group sets several keys at once):",
        *group_lines(app),
        "",
        f"Settings (KEY=VALUE: default, then what it means; the values after the groups: {command} --cfg job):",
    ]
    for k in keys:
        head = f"  {k.path}={k.default}"
        doc = f"[{k.type}] {k.doc}".rstrip()
        out.append(head.ljust(width) + "  " + doc if len(head) < width else head + "\n" + " " * width + "  " + doc)
    out += ["", "Hydra: --cfg job (the composed config) | --info | hydra.run.dir=DIR | hydra.verbose=true"]
    return "\n".join(out)


def _register() -> None:
    # Hydra fills its help template with string.Template: a literal $ is written $$
    OmegaConf.register_new_resolver("repopt_help", lambda app: app_help(app).replace("$", "$$"), replace=True)


_register()
