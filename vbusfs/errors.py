"""Errors as their callers should see them.

trio wraps whatever leaves a nursery in an exception group, however many tasks failed. Where
one task's failure is *the* failure (no common VMBus version, an image that cannot be opened)
the caller should see that error itself; :func:`single_errors` says so in one place."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["single_errors", "sole_error"]


def sole_error(group: BaseExceptionGroup[BaseException]) -> Exception | None:
    """The one error inside ``group`` (through any nesting), or None when it holds several,
    or one that is not an ``Exception`` (a cancellation, a KeyboardInterrupt)."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    if isinstance(inner, Exception) and not isinstance(inner, BaseExceptionGroup):
        return inner
    return None


@contextmanager
def single_errors() -> Iterator[None]:
    """Re-raise an exception group that holds a single error as that error."""
    try:
        yield
    except BaseExceptionGroup as group:
        err = sole_error(group)
        if err is None:
            raise
        raise err from None
