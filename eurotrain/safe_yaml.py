"""YAML read as if from a stranger: ``load_yaml`` parses as ``yaml.safe_load`` does and also
refuses what would silently change a config or exhaust memory or the stack (duplicate keys,
alias expansion beyond MAX_YAML_NODES, recursive aliases, nesting beyond MAX_YAML_DEPTH,
integers Python will not read). Config files, ``--a.b`` overrides and the run directory's
``config.yaml`` are read with it."""

from __future__ import annotations

from typing import Any, cast

import yaml

from eurotrain.errors import ConfigError, shown

__all__ = ["MAX_YAML_DEPTH", "MAX_YAML_NODES", "load_yaml"]

MAX_YAML_NODES = 100_000
"""Values (scalars, lists and mappings) a config file may hold once its aliases are expanded: a
preset holds about a hundred, while nine nested aliases of nine items each expand to 9**9 ("a
billion laughs"), which printing or walking would need gigabytes for."""
MAX_YAML_DEPTH = 50
"""Nesting levels a config file may have (a preset has four); deeper ones exhaust the stack of
the YAML reader and of everything that walks the result."""
YAML_INT_DIGITS = 4300
"""Longest integer literal read: Python's own limit for converting a string to an int."""


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also refuses what would silently change a config or exhaust memory
    or the stack: duplicate keys, alias expansion beyond MAX_YAML_NODES ("billion laughs"),
    recursive aliases, nesting beyond MAX_YAML_DEPTH and integers Python will not read.
    ``source`` ("config file 'x.yaml'", "override --a.b") starts each error."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # The composer recurses once per level: refuse before Python's stack runs out.
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError(
                    f"{self.source}: nested more than {MAX_YAML_DEPTH} levels deep at line "
                    f"{line}; a config needs a few levels (section: key: value)"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: Any) -> Any:
        _check_graph(node, self.source)
        return super().construct_document(node)

    def construct_int(self, node: Any) -> int:
        line = node.start_mark.line + 1
        if len(node.value) > YAML_INT_DIGITS:
            raise ConfigError(
                f"{self.source}: the integer at line {line} is {len(node.value)} characters "
                f"long, more than the {YAML_INT_DIGITS} digits Python reads; no setting needs "
                f"one that large"
            )
        return cast(int, self.construct_yaml_int(node))


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_int)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _check_graph(root: yaml.Node, source: str) -> None:
    """Refuse a composed YAML document whose aliases expand to more than MAX_YAML_NODES values
    or MAX_YAML_DEPTH levels, or refer to themselves, and mappings with a key twice. Each node
    is visited once (sizes and depths are memoised per node), without recursion, so the check
    costs what the file holds, not what it expands to."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        line = node.start_mark.line + 1
        if children_done:
            open_nodes.discard(key)
            children = _children(node)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > MAX_YAML_NODES or depth[key] > MAX_YAML_DEPTH:
                what = (
                    f"{MAX_YAML_NODES:,} values"
                    if size[key] > MAX_YAML_NODES
                    else f"{MAX_YAML_DEPTH} levels of nesting"
                )
                raise ConfigError(
                    f"{source}: the value at line {line} expands through its aliases (*name) "
                    f"to more than {what}; write the settings out instead of nesting aliases"
                )
        elif key in open_nodes:  # met again inside its own expansion
            raise ConfigError(
                f"{source}: the value anchored at line {line} contains an alias to itself; a "
                f"config cannot be infinite: remove that alias"
            )
        elif key not in size:
            if isinstance(node, yaml.MappingNode):
                _check_unique_keys(node, source)
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node) if id(c) not in size)


def _check_unique_keys(node: yaml.MappingNode, source: str) -> None:
    """A key given twice in one mapping: YAML keeps the last silently (a second ``train:`` block
    replaces the first). Merged keys (``<<: *base``) may be overridden, as YAML intends."""
    first: dict[tuple[str, str], yaml.Node] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
            continue
        seen = first.setdefault((key_node.tag, key_node.value), key_node)
        if seen is not key_node:
            raise ConfigError(
                f"{source}: key {shown(key_node.value)} appears twice in one mapping, at line "
                f"{seen.start_mark.line + 1} and line {key_node.start_mark.line + 1}; YAML "
                f"would keep only the second: merge them into one"
            )


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML ``text`` as safe_load does, refusing what ``_ConfigLoader`` refuses; errors
    start with ``source``. yaml.YAMLError for invalid syntax, as from safe_load."""
    loader = _ConfigLoader(text, source)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
