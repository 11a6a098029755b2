"""Pattern subscriptions indexed by segment: which patterns cover a channel.

Reference twin of ``wirehub._ext.routing``.

A name is cut into *tokens* at its separators, each separator staying with
the segment after it: ``runner:42.cpu`` is ``runner``, ``:42``, ``.cpu``.
A pattern is cut the same way, so its wildcards become the tokens ``*``,
``.*``, ``:*`` (one segment after that separator) and ``**``, ``.**``,
``:**`` (everything left). Patterns live in a trie keyed by token; no
channel name contains ``*``, so a wildcard key never collides with a
literal one. Finding the patterns that cover a name walks the trie once,
token by token, following at each node the literal child, the ``*`` child
and the ``**`` child: the cost is the name's segment count times the
number of trie nodes still matching, however many patterns there are
(NATS's sublist, MQTT brokers' topic trees).

The semantics are exactly ``protocol.patterns``'s (the tests compare the two
on random patterns and names): ``*`` is one non-empty segment; a final
``**`` is one or more segments, i.e. a non-empty rest.
"""

from __future__ import annotations

import sys
from typing import Any

_SEPARATORS = ".:"
# The wildcard tokens, by the separator before them ("" for the first segment).
_STAR = {"": "*", ".": ".*", ":": ":*"}
_REST = {"": "**", ".": ".**", ":": ":**"}


def tokens(name: str) -> list[str]:
    """``"runner:42.cpu"`` -> ``["runner", ":42", ".cpu"]`` (each separator leads its segment)."""
    out = []
    start = 0
    for i, ch in enumerate(name):
        if ch in _SEPARATORS:
            out.append(name[start:i])
            start = i
    out.append(name[start:])
    return out


class _Node:
    __slots__ = ("children", "value", "has_value")

    def __init__(self) -> None:
        self.children: dict[str, _Node] | None = None  # created with the first child
        self.value: Any = None
        self.has_value = False


class PatternIndex:
    """Patterns and a value for each, found by the channel names they cover.

    Patterns must be valid (``protocol.patterns.check_pattern``); the index
    does not validate them again.
    """

    def __init__(self) -> None:
        self._root = _Node()
        self._count = 0
        self._nodes = 1

    def __len__(self) -> int:
        return self._count

    @property
    def node_count(self) -> int:
        """Trie nodes, the root included (what the index's memory grows with)."""
        return self._nodes

    def add(self, pattern: str, value: Any) -> None:
        """Index ``pattern`` with ``value`` (replacing the value it had)."""
        node = self._root
        for token in tokens(pattern):
            if node.children is None:
                node.children = {}
            child = node.children.get(token)
            if child is None:
                # Interned: 100,000 patterns ending in ".*" share one key string.
                child = node.children[sys.intern(token)] = _Node()
                self._nodes += 1
            node = child
        if not node.has_value:
            node.has_value = True
            self._count += 1
        node.value = value

    def discard(self, pattern: str) -> None:
        """Forget ``pattern`` (nothing happens if it is not indexed), and the
        trie nodes only it used."""
        path = []
        node = self._root
        for token in tokens(pattern):
            child = node.children.get(token) if node.children is not None else None
            if child is None:
                return
            path.append((node, token))
            node = child
        if not node.has_value:
            return
        node.has_value = False
        node.value = None
        self._count -= 1
        for parent, token in reversed(path):
            if node.has_value or node.children:
                break
            del parent.children[token]
            if not parent.children:
                parent.children = None
            self._nodes -= 1
            node = parent

    def match(self, name: str) -> list[Any]:
        """The values of the patterns that cover the channel ``name``, each once.

        The order depends only on the patterns that match, so two calls
        return equal lists as long as those patterns stay indexed.
        """
        found = []
        level = [self._root]
        parts = tokens(name)
        last = len(parts) - 1
        for i, token in enumerate(parts):
            separator = token[0] if i else ""
            has_segment = len(token) > len(separator)
            has_rest = has_segment or i < last   # what follows the separator is not empty
            star, rest = _STAR[separator], _REST[separator]
            following = []
            for node in level:
                children = node.children
                if children is None:
                    continue
                child = children.get(token)
                if child is not None:
                    following.append(child)
                if has_segment:
                    child = children.get(star)
                    if child is not None:
                        following.append(child)
                if has_rest:
                    child = children.get(rest)
                    if child is not None and child.has_value:
                        found.append(child.value)
            level = following
            if not level:
                return found
        found.extend(node.value for node in level if node.has_value)
        return found
