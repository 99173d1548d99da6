"""Reading the project's YAML files: strict, safe, and with one-line errors.

Every YAML file cloudlab reads (campaign, benchmark, pretraining, fine-tuning
and simulated-lab configs) goes through :func:`read_yaml`. It differs from
``yaml.safe_load`` in three ways:

* a key written twice in one mapping is an error naming the key and both lines
  (``safe_load`` silently keeps the second, so a stray ``budget:`` at the end of
  a file replaced the real one);
* a file that is not UTF-8 text is an error naming the file, not a traceback;
* every problem is a :class:`~cloud_model.errors.ConfigError` with a one-line
  message: ``path: what: where``.

It is built on :class:`yaml.SafeLoader` (no Python object tags). This module
lives in ``cloud_model`` because ``cloud_model`` may not import ``loop``; the
loop's config readers use it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cloud_model.errors import ConfigError

__all__ = ["InvalidYamlError", "read_yaml"]

_MERGE_TAG = "tag:yaml.org,2002:merge"
# nodes a document may hold once its aliases are expanded: a config has a few hundred, and
# nested aliases ("billion laughs") would otherwise make validation and hashing run forever
MAX_EXPANDED_NODES = 1_000_000


class InvalidYamlError(ConfigError):
    """The file's text is not valid YAML; ``detail`` says what and where, in one line."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


class _DuplicateKey(Exception):
    """A key written twice in one mapping; carries the key and where it was written both times."""

    def __init__(self, key: str, first: yaml.Mark, second: yaml.Mark) -> None:
        super().__init__(key)
        self.key, self.first, self.second = key, first, second

    def where(self) -> str:
        """``at line 9 (first at line 4)``; with columns when both are on one line."""
        if self.first.line == self.second.line:
            return (
                f"at line {self.second.line + 1}, column {self.second.column + 1} (first at "
                f"column {self.first.column + 1})"
            )
        return f"at line {self.second.line + 1} (first at line {self.first.line + 1})"


def _check_unique_keys(root: yaml.Node) -> None:
    """Raise :class:`_DuplicateKey` for the first mapping of ``root`` that repeats a key.

    Runs on the composed node graph, before construction, so it sees every key
    as written. Keys brought in by a merge (``<<: *defaults``) may be overridden,
    as YAML intends; only keys written in the same mapping must be unique. Two
    scalar keys are the same when their resolved tag and text are (``1`` and
    ``"1"`` differ).
    """
    todo, visited = [root], set()
    while todo:
        node = todo.pop()
        if id(node) in visited:  # aliases share nodes
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            todo.extend(reversed(node.value))
        elif isinstance(node, yaml.MappingNode):
            first_marks: dict[tuple[str, str], yaml.Mark] = {}
            for key_node, value_node in node.value:
                todo.extend((value_node, key_node))
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = (key_node.tag, key_node.value)
                if key in first_marks:
                    raise _DuplicateKey(key_node.value, first_marks[key], key_node.start_mark)
                first_marks[key] = key_node.start_mark


def _expanded_size(root: yaml.Node) -> int:
    """Nodes of ``root`` with every alias expanded (counted without expanding them).

    Raises:
        yaml.YAMLError: an alias refers to a node that contains it (a recursive document).
    """
    sizes: dict[int, int] = {}
    entered: set[int] = set()
    todo: list[tuple[yaml.Node, bool]] = [(root, False)]
    while todo:
        node, children_done = todo.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        if children_done:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            continue
        if id(node) in entered:  # still open, so it is its own descendant
            line = node.start_mark.line + 1
            raise yaml.YAMLError(f"the anchor at line {line} is used inside itself")
        entered.add(id(node))
        todo.append((node, True))
        todo.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _load_unique(text: str) -> Any:
    """``yaml.safe_load`` of one document, refusing repeated keys."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node)
        size = _expanded_size(node)
        if size > MAX_EXPANDED_NODES:
            raise yaml.YAMLError(
                f"{size:,} nodes once its aliases are expanded, more than {MAX_EXPANDED_NODES:,}"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _one_line(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: ``context, problem at line L, column C``."""
    if isinstance(exc, yaml.MarkedYAMLError):
        text = ", ".join(part for part in (exc.context, exc.problem) if part) or "syntax error"
        if exc.problem_mark is not None:
            text += f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
        return text
    return " ".join(str(exc).split())


def read_yaml(path: str | Path, *, what: str) -> Any:
    """Parse one YAML file with unique keys.

    Args:
        path: the file.
        what: what the file is, for messages (``"campaign config"``).

    Returns:
        The document (None for an empty file).

    Raises:
        ConfigError: the file is missing or unreadable, is not UTF-8 text, or
            repeats a key in one mapping; the one-line message names the file
            and, where known, the lines.
        InvalidYamlError: (a ConfigError) the text is not valid YAML.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"cannot read {what} {path}: file not found")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path}: not a UTF-8 text file (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); give a YAML text file"
        ) from None
    try:
        return _load_unique(text)
    except _DuplicateKey as dup:
        raise ConfigError(
            f"{what} {path}: duplicate key {dup.key!r} {dup.where()}; keep one of them"
        ) from None
    except (yaml.YAMLError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else _one_line(exc)
        raise InvalidYamlError(f"{what} {path}: not valid YAML: {detail}", detail) from None
