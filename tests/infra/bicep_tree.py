"""Read Bicep with tree-sitter-bicep: syntax errors, and declarations turned into plain Python values.

No Bicep compiler ships on PyPI or npm, so this is the offline view of ``infra/bicep``: literals become Python
values (object -> dict, array -> list, 'text' -> str, numbers, booleans, null), anything computed stays an
:class:`Expr` holding its source text (``Expr("storage.outputs.blobEndpoint")``).

``.bicepparam`` files are checked by the same grammar after turning each ``param x = value`` into ``var x = value``
(tree-sitter-bicep 1.1 knows ``using`` but not type-less ``param`` assignments; the right-hand sides are ordinary
Bicep expressions either way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import tree_sitter_bicep
from tree_sitter import Language, Node, Parser

REPO = Path(__file__).resolve().parents[2]
BICEP_DIR = REPO / "infra" / "bicep"
MODULES_DIR = BICEP_DIR / "modules"

_PARSER = Parser(Language(tree_sitter_bicep.language()))


@dataclass(frozen=True)
class Expr:
    """A Bicep expression that is not a literal, kept as source text."""

    text: str


@dataclass
class Declaration:
    kind: str  # param | var | resource | module | output
    name: str
    node: Node
    decorators: dict[str, list[Any]] = field(default_factory=dict)
    type: str = ""  # param/output type, or resource 'Type@version', or module path
    value: Any = None  # default value, var value, resource/module body (dict), output value
    condition: Any = None  # the `if (...)` of a conditional resource/module
    loop: bool = False
    existing: bool = False

    @property
    def resource_type(self) -> str:
        return self.type.split("@")[0]

    @property
    def api_version(self) -> str:
        return self.type.split("@")[1] if "@" in self.type else ""


@dataclass
class BicepFile:
    path: Path
    source: bytes
    declarations: list[Declaration]

    def of_kind(self, kind: str) -> dict[str, Declaration]:
        return {d.name: d for d in self.declarations if d.kind == kind}

    @property
    def params(self) -> dict[str, Declaration]:
        return self.of_kind("param")

    @property
    def variables(self) -> dict[str, Declaration]:
        return self.of_kind("var")

    @property
    def resources(self) -> dict[str, Declaration]:
        return self.of_kind("resource")

    @property
    def modules(self) -> dict[str, Declaration]:
        return self.of_kind("module")

    @property
    def outputs(self) -> dict[str, Declaration]:
        return self.of_kind("output")

    def resources_of_type(self, resource_type: str) -> list[Declaration]:
        return [r for r in self.resources.values() if r.resource_type == resource_type and not r.existing]


def _text(node: Node) -> str:
    return (node.text or b"").decode()


def syntax_errors(source: bytes) -> list[str]:
    """Every ERROR or MISSING node, as 'line:column: ...' (1-based)."""
    found: list[str] = []

    def walk(node: Node) -> None:
        if node.is_error or node.is_missing:
            line, column = node.start_point
            what = f"missing {node.type!r}" if node.is_missing else f"unexpected {_text(node)[:40]!r}"
            found.append(f"{line + 1}:{column + 1}: {what}")
        for child in node.children:
            walk(child)

    walk(_PARSER.parse(source).root_node)
    return found


def bicepparam_as_bicep(source: bytes) -> bytes:
    return re.sub(rb"(?m)^(\s*)param(\s)", rb"\1var\2", source)


def _string(node: Node) -> str | Expr:
    parts: list[str] = []
    for child in node.children:
        if child.type == "interpolation":
            return Expr(_text(node))
        if child.type == "string_content":
            parts.append(_text(child))
        elif child.type == "escape_sequence":
            parts.append({"\\'": "'", "\\\\": "\\", "\\n": "\n", "\\t": "\t", "\\$": "$"}.get(_text(child), ""))
    return "".join(parts)


def value(node: Node | None) -> Any:
    """A literal as a Python value; anything else as Expr."""
    if node is None:
        return None
    kind = node.type
    if kind == "object":
        out: dict[str, Any] = {}
        for prop in (c for c in node.children if c.type == "object_property"):
            key_node, value_node = prop.named_children[0], prop.named_children[-1]
            key = _string(key_node) if key_node.type == "string" else _text(key_node)
            out[key if isinstance(key, str) else key.text] = value(value_node)
        return out
    if kind == "array":
        return [value(c) for c in node.named_children if c.type not in ("comment", "diagnostic_comment")]
    if kind == "string":
        return _string(node)
    if kind == "number":
        return int(_text(node))
    if kind == "boolean":
        return _text(node) == "true"
    if kind == "null":
        return None
    return Expr(_text(node))


def _decorators(node: Node | None) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    if node is None or node.type != "decorators":
        return found
    for decorator in node.named_children:
        call = decorator.named_children[0]
        if call.type == "call_expression":
            name = call.child_by_field_name("function")
            arguments = call.child_by_field_name("arguments")
            args = [value(a) for a in arguments.named_children] if arguments is not None else []
            found[_text(name) if name is not None else "?"] = args
        else:
            found[_text(call)] = []
    return found


def _body(node: Node, declaration: Declaration) -> None:
    """Fill value/condition/loop from a resource or module body (object, if, for)."""
    if node.type == "for_statement":
        declaration.loop = True
        node = next(c for c in node.named_children if c.type in ("object", "if_statement"))
    if node.type == "if_statement":
        parts = node.named_children
        declaration.condition = Expr(_text(parts[0]))
        node = parts[-1]
    declaration.value = value(node)


_KINDS = {
    "parameter_declaration": "param",
    "variable_declaration": "var",
    "resource_declaration": "resource",
    "module_declaration": "module",
    "output_declaration": "output",
}


def parse_declarations(source: bytes, path: Path) -> BicepFile:
    root = _PARSER.parse(source).root_node
    declarations: list[Declaration] = []
    pending: Node | None = None
    for node in root.named_children:
        if node.type == "decorators":
            pending = node
            continue
        kind = _KINDS.get(node.type)
        if kind is None:
            pending = None if node.type not in ("comment", "diagnostic_comment") else pending
            continue
        children = node.named_children
        declaration = Declaration(kind, _text(children[0]), node, _decorators(pending))
        pending = None
        if kind in ("param", "output"):
            declaration.type = _text(children[1]) if len(children) > 1 else ""
            declaration.value = value(children[2]) if len(children) > 2 else None
        elif kind == "var":
            declaration.value = value(children[-1])
        else:
            type_string = _string(children[1])
            declaration.type = type_string if isinstance(type_string, str) else type_string.text
            declaration.existing = any(c.type == "existing" for c in node.children)
            _body(children[-1], declaration)
        declarations.append(declaration)
    return BicepFile(path, source, declarations)


@cache
def load(path: Path) -> BicepFile:
    return parse_declarations(path.read_bytes(), path)


def bicep_files() -> list[Path]:
    return sorted(BICEP_DIR.rglob("*.bicep"))


def module(name: str) -> BicepFile:
    return load(MODULES_DIR / f"{name}.bicep")


def main() -> BicepFile:
    return load(BICEP_DIR / "main.bicep")


def bicepparam() -> BicepFile:
    path = BICEP_DIR / "main.bicepparam"
    return parse_declarations(bicepparam_as_bicep(path.read_bytes()), path)


def dig(data: Any, *keys: str | int) -> Any:
    """data['a']['b'][0]..., failing with the path that was missing."""
    for depth, key in enumerate(keys):
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError) as e:
            raise AssertionError(f"no {'/'.join(map(str, keys[: depth + 1]))} in {str(data)[:200]}") from e
    return data
