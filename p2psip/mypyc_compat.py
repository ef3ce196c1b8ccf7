"""``mypyc_attr`` for the optional compiled build (tools/build_compiled.py), importable without mypy.

mypyc reads ``@mypyc_attr(...)`` on a class it compiles (``allow_interpreted_subclasses=True`` lets a
compiled class take Python subclasses). It comes from ``mypy_extensions``, which comes with mypy; pure
Python runs without mypy, so this falls back to a decorator that does nothing. It lives in a module of its
own, never compiled: mypyc cannot compile a name defined twice as this fallback is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")

try:
    from mypy_extensions import mypyc_attr as mypyc_attr
except ImportError:

    def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[_T], _T]:
        return lambda cls: cls
