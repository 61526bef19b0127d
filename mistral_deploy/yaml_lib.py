"""PyYAML, imported without compiling the one regular expression that its import spends most on.

yaml.reader compiles Reader.NON_PRINTABLE (a negated class of wide Unicode ranges) when it is imported:
about half of `import yaml`, several milliseconds of every command that reads or writes YAML. Only PyYAML's
pure-Python reader uses it, and we read with libyaml's (recipe._parse_yaml) but where libyaml refuses a
document. So that pattern is compiled on its first use instead: while yaml.reader is imported, re's
cache holds a stand-in for it, which compiles the real pattern when asked for anything. Where re keeps no
such cache (another Python), PyYAML is imported as it is.
"""

from __future__ import annotations

import re
import sys
from typing import Any

# yaml/reader.py's Reader.NON_PRINTABLE, exactly
NON_PRINTABLE = "[^\x09\x0A\x0D\x20-\x7E\x85\xA0-\uD7FF\uE000-\uFFFD\U00010000-\U0010ffff]"


class LazyPattern:
    """A compiled pattern's stand-in: compiles it on first use, then answers as the compiled one does."""

    __slots__ = ("_pattern", "_compiled")

    def __init__(self, pattern: str) -> None:
        self._pattern = pattern
        self._compiled: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._compiled is None:
            self._compiled = re.compile(self._pattern)  # the real one, compiled (and cached) by re
        return getattr(self._compiled, name)


def import_yaml() -> Any:
    """`import yaml`, with Reader.NON_PRINTABLE compiled on first use."""
    if "yaml" in sys.modules:
        return sys.modules["yaml"]
    caches = [c for c in (getattr(re, "_cache", None), getattr(re, "_cache2", None)) if isinstance(c, dict)]
    key = (str, NON_PRINTABLE, 0)
    stand_in = LazyPattern(NON_PRINTABLE)
    if caches and not any(key in cache for cache in caches):
        caches[0][key] = stand_in
    try:
        import yaml
    finally:
        for cache in caches:  # nothing else ever gets the stand-in from re
            if cache.get(key) is stand_in:
                del cache[key]
    return yaml
