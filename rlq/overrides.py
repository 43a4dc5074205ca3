"""YAML configs with command-line overrides in the NeMo RL tutorial's syntax.

    key.path=value     set a key that the config already has (a typo is an error, not a new key)
    +key.path=value    add a key that the config does not have yet
    ++key.path=value   set the key whether or not it exists
    ~key.path          remove a key

Values are parsed as YAML scalars or flow collections (`3`, `1e-6`, `true`, `null`, `[a, b]`, `"text"`).
Validation of the result (unknown keys, bounds) is the typed config's job; this module only edits a tree.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from broker.errors import RlqError

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class ConfigError(RlqError, ValueError):
    """A config file or override that cannot be applied; the message is one line for the user."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise ConfigError(f"cannot read config file {path}: {reason}") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(tree).__name__}")
    return tree


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_value(text: str) -> Any:
    """YAML scalar or flow collection; `1e-6` is a float here (YAML 1.1 would keep it a string)."""
    if _FLOAT.match(text):
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `tree` with every override applied in order."""
    result = _deep_copy(tree)
    for item in overrides:
        _apply_one(result, item)
    return result


def _apply_one(tree: dict[str, Any], item: str) -> None:
    if item.startswith("~"):
        key, mode, value = item[1:], "delete", None
    elif "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value, +key=value, ++key=value or ~key")
    else:
        key, raw = item.split("=", 1)
        mode = "force" if key.startswith("++") else "add" if key.startswith("+") else "set"
        key = key.lstrip("+")
        value = parse_value(raw)
    if not _KEY.match(key):
        raise ConfigError(f"override {item!r}: {key!r} is not a dotted key path")
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None and mode in ("add", "force"):
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError(f"override {item!r}: {where} is not a section of the config")
        node = child
    exists = leaf in node
    if mode == "set" and not exists:
        raise ConfigError(f"override {item!r}: unknown key {key} (use ++{key}=... to add a key)")
    if mode == "add" and exists:
        raise ConfigError(f"override {item!r}: {key} already exists (use {key}=... to change it)")
    if mode == "delete":
        if not exists:
            raise ConfigError(f"override {item!r}: unknown key {key}")
        del node[leaf]
        return
    node[leaf] = value


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree
