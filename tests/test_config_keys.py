"""One source for every default: each ``_target_`` node under ``conf/`` against its target's signature.

Python signatures are the truth. A yaml key of a ``_target_`` node must be a parameter of the target (a key
the constructor does not take would fail at instantiation), and it may only repeat the Python side in one of
three ways, each visible in the file:

- the parameter has no default (the yaml must give it);
- its value differs from the Python default, and the comment heading the key says so with the words
  ``differs from the Python default`` and why (``# differs from the Python default: ...``);
- its value equals the Python default, and the comment heading the key says ``same as the Python default``
  and why it is listed anyway (the trainer group lists the arguments users set, so that ``trainer.<key>=...``
  needs no ``+``).

A value that differs without the first marker is an undeclared difference (``lightning-freeze freeze=x`` and
``X()`` would be different algorithms); a value equal to the default without the second is a copy that will
drift; a marker that is not true (a "differs" value that equals the default, or the reverse) fails too. An
interpolation (``${...}``) counts as a difference.

The comment heading a key is the nearest comment (one or more consecutive comment lines) above it at the
key's indentation, with only sibling keys (and their values) in between and no blank line: one comment may
head a block of keys. A comment at the end of a key's own line explains the value and is no marker.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_", "defaults"}
DIFFERS = "differs from the python default"
SAME = "same as the python default"
# conf/hydra/* are Hydra's own option groups (`# @package hydra.launcher`): they only compose inside the app.
YAMLS = sorted(
    p.relative_to(CONF).with_suffix("").as_posix()
    for p in CONF.rglob("*.yaml")
    if p.relative_to(CONF).parts[0] != "hydra"
)
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?:\s|$)")


def key_headings(text: str) -> dict[str, str]:
    """``{dotted key path: the comment heading it ('' when none)}`` for every mapping key written in a yaml."""
    headings: dict[str, str] = {}
    parents: list[tuple[int, str]] = []  # (indent, key) of the enclosing mapping keys
    comments: dict[int, str] = {}  # indent -> the comment heading the keys at that indent
    list_indent: int | None = None  # inside a block list: its items' lines are values, not keys
    previous_comment: int | None = None  # the indent of the line above, when it was a comment
    for raw in text.splitlines():
        line = raw.rstrip()
        indent = len(line) - len(line.lstrip(" "))
        stripped = line.strip()
        if not stripped:
            comments.clear()
            previous_comment = None
            continue
        if list_indent is not None and (indent > list_indent or stripped.startswith("-")):
            continue
        list_indent = None
        if stripped.startswith("#"):
            if previous_comment == indent:  # a comment of several lines heads the keys as one
                comments[indent] += " " + stripped.lower()
            else:
                comments = {i: c for i, c in comments.items() if i < indent}
                comments[indent] = stripped.lower()
            previous_comment = indent
            continue
        previous_comment = None
        if stripped.startswith("-"):
            list_indent = indent
            continue
        match = _KEY.match(line)
        if match is None:
            continue
        comments = {i: c for i, c in comments.items() if i <= indent}
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = ".".join([*(k for _, k in parents), match["key"]])
        headings[path] = comments.get(indent, "")
        parents.append((indent, match["key"]))
    return headings


def _package(name: str, text: str) -> str:
    """Where a config file's keys land when it is composed by name: its group (``trainer/cpu`` -> ``trainer``),
    or what its ``# @package`` line says."""
    directive = re.search(r"^# @package (\S+)", text, re.MULTILINE)
    if directive:
        return "" if directive[1] == "_global_" else directive[1]
    return name.rpartition("/")[0].replace("/", ".")


def _target_nodes(node: Any, path: str = ""):
    if isinstance(node, DictConfig) and not (node._is_none() or node._is_missing()):
        if "_target_" in node:
            yield path, node
        for key in node:
            yield from _target_nodes(node._get_node(key), f"{path}.{key}" if path else str(key))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _raw(node: DictConfig, key: Any) -> Any:
    """The value as written (an interpolation stays ``${...}``)."""
    child = node._get_node(key)
    if isinstance(child, (DictConfig, ListConfig)):
        return OmegaConf.to_container(child, resolve=False)
    return child._value()  # type: ignore[union-attr]


def same_value(value: Any, default: Any) -> bool:
    """Whether a yaml value repeats a Python default (an interpolation never does)."""
    value, default = _plain(value), _plain(default)
    if isinstance(value, str) and "${" in value:
        return False
    if isinstance(value, bool) != isinstance(default, bool):
        return False
    try:
        return bool(value == default)
    except Exception:  # e.g. an array default: not something a yaml repeats
        return False


def _problems(name: str, conf: Path = CONF) -> list[str]:
    """Every key of ``<conf>/<name>.yaml``'s ``_target_`` nodes that breaks the rules above."""
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name=name, return_hydra_config=True)
    text = (conf / f"{name}.yaml").read_text()
    package = _package(name, text)
    written = {f"{package}.{k}" if package else k: c for k, c in key_headings(text).items()}
    problems = []
    for path, node in _target_nodes(cfg):
        target = get_object(node._target_)
        parameters = inspect.signature(target).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        for key in node:
            where = f"{path}.{key}" if path else str(key)
            if key in HYDRA_KEYS or where not in written:  # keys another file wrote are checked there
                continue
            heading = written[where]
            parameter = parameters.get(str(key))
            if parameter is None or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                if not takes_kwargs:
                    problems.append(f"{name}.yaml {where}: not a parameter of {node._target_}")
                continue
            if parameter.default is inspect.Parameter.empty:
                continue  # required: the yaml must give it
            value = _raw(node, key)
            same = same_value(value, parameter.default)
            if same and DIFFERS in heading:
                problems.append(f"{name}.yaml {where}: marked as differing but equals the default")
            elif not same and SAME in heading:
                problems.append(f"{name}.yaml {where}: marked as the default but differs from it")
            elif same and SAME not in heading:
                problems.append(
                    f"{name}.yaml {where}: {_plain(value)!r} repeats the Python default of {node._target_} "
                    f"(drop it, or head it with a comment saying '{SAME}' and why it is listed)"
                )
            elif not same and DIFFERS not in heading:
                problems.append(
                    f"{name}.yaml {where}: {_plain(value)!r} differs from the Python default "
                    f"{parameter.default!r} of {node._target_} without a comment above it saying "
                    f"'{DIFFERS}: <why>'"
                )
    return problems


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_values_differ_from_the_python_defaults_only_where_declared(name):
    problems = _problems(name)
    assert not problems, "\n".join(problems)


def test_key_headings_follow_blocks_lists_and_blank_lines():
    text = (
        "# differs from the Python default: a\n"
        "a: 1\n"
        "b: 2  # an inline comment is no marker\n"
        "\n"
        "c: 3\n"
        "d:\n"
        "  # same as the Python default: listed\n"
        "  e: 4\n"
        "  items:\n"
        "    - f: 5\n"
        "      g: 6\n"
        "  h: 7\n"
        "# new block,\n"
        "# two lines\n"
        "i: 8\n"
    )
    headings = key_headings(text)
    assert headings == {
        "a": "# differs from the python default: a",
        "b": "# differs from the python default: a",  # the same block
        "c": "",  # a blank line ends a block
        "d": "",
        "d.e": "# same as the python default: listed",
        "d.items": "# same as the python default: listed",
        "d.h": "# same as the python default: listed",  # list items are values, not keys
        "i": "# new block, # two lines",
    }


def test_the_check_catches_each_kind_of_undeclared_repeat(tmp_path):
    """The rules bite: an unmarked difference, an unmarked copy, a false marker, an unknown key."""
    cases = {
        "unmarked_difference": "_target_: lightning.pytorch.callbacks.ModelCheckpoint\nsave_top_k: 3\n",
        "unmarked_copy": "_target_: lightning.pytorch.callbacks.ModelCheckpoint\nsave_top_k: 1\n",
        "false_differs": (
            "_target_: lightning.pytorch.callbacks.ModelCheckpoint\n"
            "# differs from the Python default: no, it does not\nsave_top_k: 1\n"
        ),
        "false_same": (
            "_target_: lightning.pytorch.callbacks.ModelCheckpoint\n"
            "# same as the Python default: no, it is not\nsave_top_k: 2\n"
        ),
        "unknown_key": "_target_: lightning.pytorch.callbacks.ModelCheckpoint\nsave_top: 1\n",
        "declared": (
            "_target_: lightning.pytorch.callbacks.ModelCheckpoint\n"
            "# differs from the Python default: keep three\nsave_top_k: 3\n"
        ),
    }
    for name, text in cases.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    found = {name: _problems(name, tmp_path) for name in cases}
    assert "differs from the Python default 1" in found["unmarked_difference"][0]
    assert "repeats the Python default" in found["unmarked_copy"][0]
    assert "marked as differing" in found["false_differs"][0]
    assert "marked as the default" in found["false_same"][0]
    assert "not a parameter" in found["unknown_key"][0]
    assert found["declared"] == []
