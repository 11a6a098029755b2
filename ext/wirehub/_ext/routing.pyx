# cython: freethreading_compatible = True
"""Pattern subscriptions indexed by segment: which patterns cover a channel.

A name is cut into tokens at its separators, each separator leading the
segment after it (``runner:42.cpu`` -> ``runner``, ``:42``, ``.cpu``); a
pattern's wildcards become the tokens ``*``/``.*``/``:*`` and
``**``/``.**``/``:**``. Patterns sit in a trie keyed by token, and a lookup
follows the literal, ``*`` and ``**`` children token by token: its cost is
the name's segments times the trie nodes still matching, independent of
the number of patterns. Reference twin (and the full explanation):
``wirehub._pure.routing``.
"""

cimport cython

from sys import intern

# Wildcard tokens by the separator before them.
cdef str STAR_FIRST = "*"
cdef str STAR_DOT = ".*"
cdef str STAR_COLON = ":*"
cdef str REST_FIRST = "**"
cdef str REST_DOT = ".**"
cdef str REST_COLON = ":**"


cdef inline bint _is_separator(Py_UCS4 ch) noexcept:
    return ch == u'.' or ch == u':'


cpdef list tokens(str name):
    """``"runner:42.cpu"`` -> ``["runner", ":42", ".cpu"]`` (each separator leads its segment)."""
    cdef list out = []
    cdef Py_ssize_t i, start = 0, n = len(name)
    for i in range(n):
        if _is_separator(name[i]):
            out.append(name[start:i])
            start = i
    out.append(name[start:n])
    return out


@cython.final
cdef class _Node:
    cdef dict children          # token -> _Node; None until the first child
    cdef object value
    cdef bint has_value


@cython.final
cdef class PatternIndex:
    """Patterns and a value for each, found by the channel names they cover.

    Patterns must be valid (``protocol.patterns.check_pattern``); the index
    does not validate them again.
    """

    cdef _Node _root
    cdef Py_ssize_t _count
    cdef Py_ssize_t _nodes

    def __init__(self):
        self._root = _Node()
        self._count = 0
        self._nodes = 1

    def __len__(self):
        return self._count

    @property
    def node_count(self):
        """Trie nodes, the root included (what the index's memory grows with)."""
        return self._nodes

    def add(self, str pattern not None, value):
        """Index ``pattern`` with ``value`` (replacing the value it had)."""
        cdef _Node node = self._root
        cdef _Node child
        for token in tokens(pattern):
            if node.children is None:
                node.children = {}
            child = node.children.get(token)
            if child is None:
                # Interned: 100,000 patterns ending in ".*" share one key string.
                child = _Node()
                node.children[intern(token)] = child
                self._nodes += 1
            node = child
        if not node.has_value:
            node.has_value = True
            self._count += 1
        node.value = value

    def discard(self, str pattern not None):
        """Forget ``pattern`` (nothing happens if it is not indexed), and the
        trie nodes only it used."""
        cdef list path = []
        cdef _Node node = self._root
        cdef _Node child, parent
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

    cpdef list match(self, str name):
        """The values of the patterns that cover the channel ``name``, each once.

        The order depends only on the patterns that match, so two calls
        return equal lists as long as those patterns stay indexed.
        """
        cdef list found = []
        cdef list level = [self._root]
        cdef list following
        cdef _Node node, child
        cdef dict children
        cdef Py_ssize_t n = len(name), start = 0, end
        cdef bint first = True, has_segment, has_rest
        cdef str token, star, rest
        cdef Py_UCS4 separator
        while True:
            # The token starting at ``start``: its separator (none for the
            # first), then up to the next separator.
            end = start if first else start + 1
            while end < n and not _is_separator(name[end]):
                end += 1
            token = name[start:end]
            if first:
                star, rest = STAR_FIRST, REST_FIRST
                has_segment = end > start
            else:
                separator = name[start]
                star, rest = (STAR_DOT, REST_DOT) if separator == u'.' else (STAR_COLON, REST_COLON)
                has_segment = end > start + 1
            has_rest = has_segment or end < n   # what follows the separator is not empty
            following = []
            for obj in level:
                children = (<_Node>obj).children
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
            if end >= n:
                break
            start = end
            first = False
        for obj in level:
            node = <_Node>obj
            if node.has_value:
                found.append(node.value)
        return found
