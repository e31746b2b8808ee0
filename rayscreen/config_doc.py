"""The config reference (``docs/config.md``, ``rayscreen config --reference``), generated
from the dataclasses of :mod:`rayscreen.config`: every key with its type, default and the
comment written beside it (or on the lines just above it), so the reference cannot drift
from the parser. A test compares ``docs/config.md`` with :func:`config_reference`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import typing
from typing import Any

from . import config as _config

_HEADER = """# Config reference

Generated from `rayscreen/config.py` by `rayscreen config --reference > docs/config.md`
(a test fails when this file and the code disagree). One YAML file per screen; every key
is optional except `plates` and `output`. A key is written nested in YAML (`train:` then
`epochs: 2` indented below it) or dotted on the command line (`--set train.epochs=2`).
`rayscreen config CONFIG` prints a config with every default filled in.
"""


def field_notes(cls: type) -> dict[str, str]:
    """Field name -> its comment in the source of dataclass ``cls``: the comment lines just
    above the field (after the previous one) followed by the comment on its own line.
    Read with ast + tokenize rather than a regex: a ``#`` inside a default string is not a
    comment."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    notes: dict[str, str] = {}
    body = ast.parse(source).body[0]
    for node in getattr(body, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        line = node.lineno - 1
        while line in comments and line not in code_lines:  # a block of whole-line comments
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[node.end_lineno]] if node.end_lineno in comments else []
        notes[node.target.id] = " ".join(above + trailing)
    return notes


def _type_name(tp: Any) -> str:
    """A field's type as a table cell (``|`` escaped)."""
    if typing.get_origin(tp) is typing.Literal:
        text = " | ".join(json.dumps(a) for a in typing.get_args(tp))
    elif isinstance(tp, type) and typing.get_origin(tp) is None:
        text = tp.__name__
    else:
        text = str(tp).replace("typing.", "").replace("NoneType", "None")
    return text.replace("|", "\\|")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "**required**"
    return f"`{json.dumps(value)}`".replace("|", "\\|")


def _sections(cls: type, prefix: str) -> list[tuple[str, type]]:
    """(dotted prefix, dataclass) of ``cls`` and every nested section, depth first."""
    out = [(prefix, cls)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _sections(tp, f"{prefix}{f.name}.")
    return out


def _markdown(note: str) -> str:
    """A comment as a table cell: no column breaks, no text taken for HTML tags."""
    return note.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def config_reference() -> str:
    """The Markdown reference of every config key (see the module docstring)."""
    parts = [_HEADER]
    for prefix, cls in _sections(_config.Config, ""):
        hints = typing.get_type_hints(cls)
        notes = field_notes(cls)
        title = prefix.rstrip(".") or "top level"
        parts.append(f"\n## `{title}`\n" if prefix else f"\n## {title}\n")
        doc = inspect.getdoc(cls) or ""
        if doc and not doc.startswith(cls.__name__ + "("):  # dataclasses' generated signature
            parts.append("\n" + " ".join(doc.split()) + "\n")
        parts.append("\n| key | type | default | |\n|---|---|---|---|\n")
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                note = f"see [`{prefix}{f.name}`](#{(prefix + f.name).replace('.', '')})"
            else:
                note = notes.get(f.name, "")
            parts.append(f"| `{prefix}{f.name}` | {_type_name(tp)} | {_default(f)} | {_markdown(note)} |\n")
    return "".join(parts)
