"""The run dir's ``training_params.yaml``: the resolved training_params as PyYAML's ``safe_dump`` writes them.

Most entries are one-word scalars (``max_epochs: 10``, ``optimizer: SGD``), empty containers, or flat lists and
dicts of them, whose text needs no YAML analysis; those are written here directly, and everything else (deeper
nesting, strings that need quotes or are YAML words, non-identifier keys) goes through PyYAML, a run of
consecutive entries per call. PyYAML's Python
representer was most of the cost of starting a short run (~0.8 ms of a 128-step fit); the file's text is the
same byte for byte (tests/test_params_yaml.py compares it with ``yaml.dump`` of the whole mapping).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import yaml

from .files import atomic_write_text
from .params import plain_value

__all__ = ["write_params_yaml", "params_yaml_text"]

# PyYAML's C dumper writes the same text as OmegaConf.to_yaml, 40x faster
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
# identifier-like words that YAML 1.1 (PyYAML's resolver) reads as booleans or null: PyYAML quotes them as strings
_YAML_WORDS = frozenset("yes Yes YES no No NO true True TRUE false False FALSE on On ON off Off OFF "
                        "null Null NULL".split())


def write_params_yaml(params: Mapping[str, Any], path: Path) -> None:
    """The resolved training_params as ``training_params.yaml``; objects YAML cannot hold are written as their
    repr, enums as their name."""
    atomic_write_text(path, params_yaml_text(params))


def params_yaml_text(params: Mapping[str, Any]) -> str:
    """``yaml.dump(plain(params), Dumper=CSafeDumper, sort_keys=False, allow_unicode=True)``, faster."""
    parts: List[str] = []
    pending: Dict[str, Any] = {}  # entries PyYAML writes, in order
    for key, value in params.items():
        key, value = str(key), _plain(value)
        line = _simple_line(key, value)
        if line is None:
            pending[key] = value
            continue
        if pending:
            parts.append(_dump(pending))
            pending = {}
        parts.append(line)
    if pending or not parts:
        parts.append(_dump(pending))
    return "".join(parts)


def _dump(mapping: Dict[str, Any]) -> str:
    # top-level entries of a block mapping are written independently of each other, so runs of them dumped
    # separately concatenate to the text of one dump
    return yaml.dump(mapping, Dumper=_DUMPER, sort_keys=False, allow_unicode=True)


def _simple_line(key: str, value: Any) -> Optional[str]:
    """The text PyYAML writes for ``key: value`` at the top level, when the key is a plain word and the value a
    one-word scalar, an empty list or dict, or a list or dict of one-word scalars (block style: a list's items
    "- " unindented, a dict's entries indented by two); None otherwise."""
    if not _is_word(key):
        return None
    kind = type(value)
    if kind is list or kind is dict:
        if not value:
            return f"{key}: {'[]' if kind is list else '{}'}\n"
        if kind is list:
            items = [_scalar_text(item) for item in value]
            return None if None in items else f"{key}:\n" + "".join(f"- {text}\n" for text in items)
        entries = [(k, _scalar_text(v)) for k, v in value.items()]
        if any(text is None or not _is_word(k) for k, text in entries):
            return None
        return f"{key}:\n" + "".join(f"  {k}: {text}\n" for k, text in entries)
    text = _scalar_text(value)
    return None if text is None else f"{key}: {text}\n"


def _scalar_text(value: Any) -> Optional[str]:
    """SafeRepresenter's plain text for None, a bool, an int, a float or a one-word string; None for others."""
    kind = type(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        return _float_text(value)
    if kind is str and _is_word(value):
        return value
    return None


def _is_word(text: str) -> bool:
    # short: PyYAML writes a key longer than 128 characters as a complex key ("? ...")
    return len(text) < 100 and _WORD.match(text) is not None and text not in _YAML_WORDS


def _float_text(value: float) -> str:
    """SafeRepresenter.represent_float's text."""
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value).lower()
    return text.replace("e", ".0e", 1) if "." not in text and "e" in text else text


def _plain(value: Any) -> Any:
    return plain_value(value, repr)
