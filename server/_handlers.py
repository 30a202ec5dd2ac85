"""The handler plug-in: ``package.module:callable`` resolved to a :data:`pool.Handler`."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, cast

from pool import Handler
from server._errors import ServiceError

__all__ = ["HandlerLoadError", "load_handler"]


class HandlerLoadError(ServiceError, ImportError):
    """The configured handler cannot be used. ``path`` is the import path, ``problem``
    one of ``"syntax"``, ``"module-not-found"``, ``"import-failed"``,
    ``"attribute-missing"``, ``"not-callable"``, ``"bad-signature"``."""

    def __init__(self, path: str, problem: str, detail: str) -> None:
        super().__init__(f"handler {path!r}: {detail}")
        self.path = path
        self.problem = problem


def load_handler(path: str) -> Handler:
    """Import ``package.module:callable`` (the attribute may be dotted: ``mod:obj.method``).

    The result must be callable with one positional argument (a
    :class:`pool.Message`). ``async def`` handlers run on the event loop,
    plain functions in the pool's thread pool. Raises :class:`HandlerLoadError`.
    """
    module_name, sep, attr_path = path.strip().partition(":")
    if not sep or not module_name or not attr_path:
        raise HandlerLoadError(path, "syntax", "must be 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            module_name == exc.name or module_name.startswith(exc.name + ".")
        ):
            raise HandlerLoadError(
                path, "module-not-found", f"module {module_name!r} not found"
            ) from exc
        raise HandlerLoadError(
            path, "import-failed", f"importing {module_name!r} failed: {exc}"
        ) from exc
    except Exception as exc:
        raise HandlerLoadError(
            path,
            "import-failed",
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}",
        ) from exc
    target: Any = module
    walked = module_name
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerLoadError(
                path, "attribute-missing", f"{walked!r} has no attribute {part!r}"
            ) from None
        walked = f"{walked}.{part}" if walked != module_name else f"{module_name}:{part}"
    if not callable(target):
        raise HandlerLoadError(
            path, "not-callable", f"{attr_path!r} is a {type(target).__name__}, not callable"
        )
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return cast(Handler, target)
    try:
        signature.bind(object())
    except TypeError:
        raise HandlerLoadError(
            path,
            "bad-signature",
            f"{attr_path}{signature} cannot be called with one argument (a pool.Message)",
        ) from None
    return cast(Handler, target)
