"""Targets: device tags and the selector language that picks devices by tags, inventory and groups.

    selector   := or
    or         := and ("OR" and)*
    and        := not (("AND" | ",") not)*
    not        := "NOT" not | "(" or ")" | term
    term       := KEY OP VALUE | KEY ["NOT"] "IN" "(" VALUE ("," VALUE)* ")"
    OP         := = | != | >= | <= | > | <

Examples: `tag=canary`, `tag=canary,arch=x86_64,memory_bytes>=2e9` (the comma is AND),
`arch IN (x86_64, aarch64) AND NOT tag=lab`, `(tag=canary OR tag=beta) AND memory_bytes>=4e9`,
`group=kiosks`. Keywords are case-insensitive; a VALUE is a bare word (no spaces, commas,
parentheses, quotes or = ! < >) or a quoted string ("my device", 'x,y').

Keys: `tag` (= has the tag, != lacks it), `id`, `name`, `group` (= is a member of the named group),
and the inventory keys (`INVENTORY_KEYS`). Numbers compare as numbers; a list (providers,
cpu_features) `=` means it contains the value; a key the device did not report matches nothing
(and `!=` nothing either). A selector that cannot be parsed is a `SelectorError` naming the column
and what was expected there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from slmops_fleet.rollouts.waves import PlanError

MAX_TAGS = 32
MAX_SELECTOR_CHARS = 1000
MAX_DEPTH = 32
_TAG = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_ORDERING = {">=", "<=", ">", "<"}
INVENTORY_KEYS = (
    "os",
    "arch",
    "cpu_count",
    "memory_bytes",
    "disk_free_bytes",
    "providers",
    "cpu_features",
    "agent_version",
)
KEYS = ("tag", "id", "name", "group", *INVENTORY_KEYS)
_KEYWORDS = {"AND", "OR", "NOT", "IN"}
_TOKEN = re.compile(
    r"""(?P<space>\s+)
    |(?P<op>>=|<=|!=|=|>|<)
    |(?P<punct>[(),])
    |(?P<quoted>"[^"]*"|'[^']*')
    |(?P<word>[^\s(),"'=!<>]+)""",
    re.VERBOSE,
)


def check_tags(tags: Sequence[str]) -> list[str]:
    """Valid, deduplicated, sorted tags, or a PlanError naming the bad one."""
    for tag in tags:
        if not _TAG.match(tag):
            raise PlanError(f"tag {tag[:80]!r} must be 1-64 letters, digits or _ . : -")
    out = sorted(set(tags))
    if len(out) > MAX_TAGS:
        raise PlanError(f"a device has at most {MAX_TAGS} tags, got {len(out)}")
    return out


class SelectorError(PlanError):
    """A selector that cannot be parsed; `column` (1-based) is where the parser stopped."""

    def __init__(self, text: str, column: int, message: str) -> None:
        super().__init__(f"selector {text[:120]!r}: column {column}: {message}")
        self.column = column
        self.detail = message


@dataclass(frozen=True)
class DeviceFacts:
    """What a selector can look at: the device, and a test of its membership in a named group."""

    device_id: str
    name: str = ""
    tags: Sequence[str] = ()
    inventory: dict[str, Any] = field(default_factory=dict)
    in_group: Callable[[str], bool] = field(default=lambda _name: False, compare=False)


@dataclass(frozen=True)
class Term:
    key: str
    op: str
    value: str
    column: int = field(default=0, compare=False)  # where the term starts in the selector (1-based)

    def __str__(self) -> str:
        return f"{self.key}{self.op}{_quote(self.value)}"

    def holds(self, d: DeviceFacts) -> bool:
        if self.key == "tag":
            return (self.value in d.tags) == (self.op == "=")
        if self.key == "group":
            return d.in_group(self.value) == (self.op == "=")
        if self.key == "id":
            have: Any = d.device_id
        elif self.key == "name":
            have = d.name
        elif self.key in d.inventory:
            have = d.inventory[self.key]
        else:
            return False
        if isinstance(have, list):
            if self.op not in ("=", "!="):
                return False
            return (self.value in [str(x) for x in have]) == (self.op == "=")
        left, right = _number(have), _number(self.value)
        if left is not None and right is not None and not isinstance(have, str):
            return {
                "=": left == right,
                "!=": left != right,
                ">=": left >= right,
                "<=": left <= right,
                ">": left > right,
                "<": left < right,
            }[self.op]
        if self.op in _ORDERING:
            return False
        return (str(have) == self.value) == (self.op == "=")


@dataclass(frozen=True)
class In:
    key: str
    values: tuple[str, ...]
    negated: bool = False
    column: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return f"{self.key} {'NOT IN' if self.negated else 'IN'} ({', '.join(_quote(v) for v in self.values)})"

    def holds(self, d: DeviceFacts) -> bool:
        hit = any(Term(self.key, "=", v).holds(d) for v in self.values)
        return hit != self.negated


@dataclass(frozen=True)
class Not:
    inner: Node

    def __str__(self) -> str:
        return f"NOT {_wrap(self.inner)}"

    def holds(self, d: DeviceFacts) -> bool:
        return not self.inner.holds(d)


@dataclass(frozen=True)
class AllOf:
    items: tuple[Node, ...]

    def __str__(self) -> str:
        return " AND ".join(_wrap(x) for x in self.items)

    def holds(self, d: DeviceFacts) -> bool:
        return all(x.holds(d) for x in self.items)


@dataclass(frozen=True)
class AnyOf:
    items: tuple[Node, ...]

    def __str__(self) -> str:
        return " OR ".join(_wrap(x) for x in self.items)

    def holds(self, d: DeviceFacts) -> bool:
        return any(x.holds(d) for x in self.items)


Node = Term | In | Not | AllOf | AnyOf


@dataclass(frozen=True)
class Selector:
    """A parsed selector; the empty selector matches every device."""

    text: str
    root: Node | None

    def matches(self, device: DeviceFacts) -> bool:
        return self.root is None or self.root.holds(device)

    def groups(self) -> list[tuple[str, int]]:
        """The group names the selector refers to, with the column of each term that names one."""
        out: list[tuple[str, int]] = []
        stack: list[Node] = [self.root] if self.root is not None else []
        while stack:
            node = stack.pop()
            if isinstance(node, Term | In) and node.key == "group":
                out += [(v, node.column) for v in ([node.value] if isinstance(node, Term) else node.values)]
            elif isinstance(node, Not):
                stack.append(node.inner)
            elif isinstance(node, AllOf | AnyOf):
                stack.extend(node.items)
        return out

    def __str__(self) -> str:
        return str(self.root) if self.root is not None else ""


def _quote(value: str) -> str:
    return value if re.fullmatch(r"[^\s(),\"'=!<>]+", value) and value.upper() not in _KEYWORDS else repr(value)


def _wrap(node: Node) -> str:
    return f"({node})" if isinstance(node, AllOf | AnyOf) and len(node.items) > 1 else str(node)


def _number(text: Any) -> float | None:
    if isinstance(text, bool):
        return None
    if isinstance(text, int | float):
        return float(text)
    try:
        return float(str(text))
    except ValueError:
        return None


@dataclass(frozen=True)
class _Token:
    kind: str  # op, punct, quoted, word, keyword, end
    text: str
    column: int  # 1-based

    def describe(self) -> str:
        return "the end of the selector" if self.kind == "end" else repr(self.text)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = self._lex(text)
        self.pos = 0
        self.depth = 0

    def _lex(self, text: str) -> list[_Token]:
        out: list[_Token] = []
        i = 0
        while i < len(text):
            m = _TOKEN.match(text, i)
            if m is None:
                char = text[i]
                what = "an unclosed quote" if char in "\"'" else f"{char!r} cannot start a term"
                raise SelectorError(text, i + 1, what)
            kind = m.lastgroup or "space"
            if kind != "space":
                value = m.group()
                if kind == "word" and value.upper() in _KEYWORDS:
                    kind, value = "keyword", value.upper()
                out.append(_Token(kind, value, i + 1))
            i = m.end()
        out.append(_Token("end", "", len(text) + 1))
        return out

    @property
    def token(self) -> _Token:
        return self.tokens[self.pos]

    def fail(self, expected: str, token: _Token | None = None) -> SelectorError:
        tok = token or self.token
        return SelectorError(self.text, tok.column, f"expected {expected}, got {tok.describe()}")

    def take(self, kind: str, text: str | None = None) -> bool:
        tok = self.token
        if tok.kind == kind and (text is None or tok.text == text):
            self.pos += 1
            return True
        return False

    def parse(self) -> Node:
        node = self.or_()
        if self.token.kind != "end":
            raise self.fail("AND, OR, ',' or the end of the selector")
        return node

    def or_(self) -> Node:
        items = [self.and_()]
        while self.take("keyword", "OR"):
            items.append(self.and_())
        return items[0] if len(items) == 1 else AnyOf(tuple(items))

    def and_(self) -> Node:
        items = [self.not_()]
        while self.take("keyword", "AND") or self.take("punct", ","):
            items.append(self.not_())
        return items[0] if len(items) == 1 else AllOf(tuple(items))

    def not_(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise SelectorError(self.text, self.token.column, f"nested deeper than {MAX_DEPTH} levels")
        try:
            if self.take("keyword", "NOT"):
                return Not(self.not_())
            if self.take("punct", "("):
                node = self.or_()
                if not self.take("punct", ")"):
                    raise self.fail("')' or AND, OR, ','")
                return node
            return self.term()
        finally:
            self.depth -= 1

    def term(self) -> Node:
        tok = self.token
        if tok.kind != "word":
            raise self.fail("a term such as tag=canary (KEY=VALUE, KEY IN (...), NOT ..., or '(')")
        if tok.text not in KEYS:
            raise SelectorError(self.text, tok.column, f"unknown key {tok.text!r}: one of {', '.join(KEYS)}")
        self.pos += 1
        key = tok.text
        negated = self.take("keyword", "NOT")
        if negated or (self.token.kind == "keyword" and self.token.text == "IN"):
            if not self.take("keyword", "IN"):
                raise self.fail("IN after NOT")
            return In(key, self.values(key), negated, tok.column)
        op = self.token
        if op.kind != "op":
            raise self.fail(f"=, !=, >=, <=, >, < or IN after {key!r}")
        self.pos += 1
        value = self.value()
        if op.text in _ORDERING and _number(value.text) is None:
            raise SelectorError(self.text, value.column, f"{op.text} needs a number, got {value.describe()}")
        if key in ("tag", "group") and op.text in _ORDERING:
            raise SelectorError(self.text, op.column, f"{key} takes = or != only")
        return Term(key, op.text, _unquote(value), tok.column)

    def values(self, key: str) -> tuple[str, ...]:
        if not self.take("punct", "("):
            raise self.fail(f"'(' after {key} IN")
        out = [_unquote(self.value())]
        while self.take("punct", ","):
            out.append(_unquote(self.value()))
        if not self.take("punct", ")"):
            raise self.fail("',' or ')'")
        return tuple(out)

    def value(self) -> _Token:
        tok = self.token
        if tok.kind not in ("word", "quoted") or (tok.kind == "quoted" and len(tok.text) <= 2):
            raise self.fail("a value (a word or a quoted string)")
        self.pos += 1
        return tok


def _unquote(tok: _Token) -> str:
    return tok.text[1:-1] if tok.kind == "quoted" else tok.text


def parse_selector(text: str | None) -> Selector:
    """Parse a selector (see the module's grammar); a SelectorError names the column of a mistake."""
    text = text or ""
    if len(text) > MAX_SELECTOR_CHARS:
        raise SelectorError(text, MAX_SELECTOR_CHARS + 1, f"a selector is at most {MAX_SELECTOR_CHARS} characters")
    if not text.strip():
        return Selector(text, None)
    return Selector(text, _Parser(text).parse())


def check_groups(selector: Selector, known: set[str] | None) -> None:
    """A SelectorError at the first group the selector names that is not in `known` (None: a group's
    own selector, which may name no group)."""
    for name, column in sorted(selector.groups(), key=lambda x: x[1]):
        if known is None:
            raise SelectorError(selector.text, column, "a group's selector cannot refer to groups")
        if name not in known:
            raise SelectorError(selector.text, column, f"unknown group {name!r}")
