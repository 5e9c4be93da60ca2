"""Users' own processors: an import path becomes a processor, or one line saying why not.

`resolve("myjobs.push:send_push")` imports the module and finds the attribute;
`inspect_target()` tells a handler (an async function taking the job body) from a
factory (a callable taking `app.jobs.Resources`), checking the signature the way
the runner will call it; `as_processor()` wraps a handler in the Processor protocol
(validate the body as its annotation says, then call it). A factory is called at
start, in the lifespan, and what it returns is checked with `from_factory()`.

Every problem is a `PluginError` whose text is one line that says what to write
instead (pgqueuer's `validate_factory_result` does the same): the registry
prefixes it with the file, the queue and the key.
"""

from __future__ import annotations

import importlib
import inspect
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from app.errors import PermanentError
from app.jobs import Message, Resources
from app.processors import Processor, parse_body

# module.path:attribute(.attribute)
IMPORT_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
HANDLER_EXAMPLE = "async def {name}(job: dict) -> None"
FACTORY_EXAMPLE = "def {name}(resources: app.jobs.Resources) -> <an async function taking the job>"


class PluginError(Exception):
    """What is wrong with a processor named by import path; one line."""


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]


def resolve(path: str) -> Any:
    """The object an import path names; PluginError when it cannot be had."""
    if not IMPORT_PATH.fullmatch(path):
        raise PluginError(
            f"{path!r} is neither a built-in processor nor an import path like "
            "'myjobs.push:send_push' (module:attribute)"
        )
    module_name, _, attributes = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or module_name
        raise PluginError(
            f"cannot import {module_name!r}: no module named {missing!r} (the directory "
            "holding queues.toml and the installed packages were searched)"
        ) from None
    except Exception as error:  # noqa: BLE001 - whatever the module raised, as one line
        raise PluginError(
            f"importing {module_name!r} failed: {type(error).__name__}: {_one_line(error)}"
        ) from None
    for attribute in attributes.split("."):
        try:
            target = getattr(target, attribute)
        except AttributeError:
            raise PluginError(f"{module_name!r} has no attribute {attributes!r}") from None
    return target


@dataclass(frozen=True)
class Handler:
    """An async function as the runner calls it: the body, maybe the message too."""

    function: Any
    model: type[BaseModel] | None  # None: the body as a dict
    with_message: bool


@dataclass(frozen=True)
class Factory:
    function: Any


def _hints(target: Any) -> dict[str, Any]:
    function = target.__init__ if inspect.isclass(target) else target
    if not (inspect.isfunction(function) or inspect.ismethod(function)):
        function = type(target).__call__
    try:
        return typing.get_type_hints(function)
    except Exception as error:  # noqa: BLE001 - an annotation that does not resolve
        raise PluginError(
            f"its annotations do not resolve ({type(error).__name__}: {_one_line(error)})"
        ) from None


def _parameters(target: Any) -> list[inspect.Parameter]:
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        raise PluginError("its signature cannot be read") from None
    return list(signature.parameters.values())


def _is_async(target: Any) -> bool:
    if inspect.iscoroutinefunction(target):
        return True
    if inspect.isclass(target) or not callable(target):
        return False
    return inspect.iscoroutinefunction(type(target).__call__)


def inspect_target(target: Any, name: str, example: str | None = None) -> Handler | Factory:
    """What `target` is, or PluginError naming the code that should have been written.

    `example` is the function name the suggestions use (a factory's inner function);
    by default the attribute's own name.
    """
    if not callable(target):
        raise PluginError(
            f"{name} is a {type(target).__name__}, not a function; write "
            + HANDLER_EXAMPLE.format(name=name.rpartition(":")[2])
        )
    short = example or name.rpartition(":")[2].rpartition(".")[2]
    hints = _hints(target)
    parameters = _parameters(target)
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    required_keywords = [
        p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    ]
    if required_keywords:
        raise PluginError(
            f"{name} requires keyword argument(s) {', '.join(required_keywords)} that the "
            f"worker cannot give; write {HANDLER_EXAMPLE.format(name=short)}"
        )
    if positional and hints.get(positional[0].name) is Resources:
        if len(positional) != 1:
            raise PluginError(
                f"{name} looks like a factory (it takes Resources) but requires "
                f"{len(positional)} arguments; write {FACTORY_EXAMPLE.format(name=short)}"
            )
        return Factory(target)
    return _handler(target, name, short, hints, positional, factory_hint=example is None)


def _handler(
    target: Any,
    name: str,
    short: str,
    hints: dict[str, Any],
    positional: list[inspect.Parameter],
    *,
    factory_hint: bool,
) -> Handler:
    if not _is_async(target):
        alternative = f", or a factory {FACTORY_EXAMPLE.format(name=short)}" if factory_hint else ""
        raise PluginError(
            f"{name} is not async; write {HANDLER_EXAMPLE.format(name=short)}{alternative}"
        )
    if not 1 <= len(positional) <= 2:
        raise PluginError(
            f"{name} takes {len(positional)} arguments; a processor takes the job body (and, "
            f"optionally, the Message): write {HANDLER_EXAMPLE.format(name=short)}"
        )
    model = _body_model(hints.get(positional[0].name, Any), name, short)
    if len(positional) == 2:
        second = hints.get(positional[1].name, Any)
        if second not in (Any, Message):
            raise PluginError(
                f"{name}: its second parameter receives the claimed message; annotate it "
                "app.jobs.Message or leave it unannotated"
            )
    return Handler(target, model, len(positional) == 2)


def _body_model(annotation: Any, name: str, short: str) -> type[BaseModel] | None:
    if annotation in (Any, dict, Mapping) or typing.get_origin(annotation) in (dict, Mapping):
        return None
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    raise PluginError(
        f"{name}: the job parameter is annotated {annotation!r}; annotate it dict or a "
        f"pydantic model, as in async def {short}(job: MyJob) -> None"
    )


class FunctionProcessor:
    """A handler function behind the Processor protocol."""

    __slots__ = ("_function", "_with_message", "model")

    def __init__(self, handler: Handler) -> None:
        self._function = handler.function
        self._with_message = handler.with_message
        self.model = handler.model

    def _job(self, body: Any) -> Any:
        if self.model is not None:
            return parse_body(self.model, body)
        if not isinstance(body, dict):
            raise PermanentError("invalid message: message: must be a JSON object")
        return body

    def validate(self, body: Any) -> None:
        self._job(body)

    async def __call__(self, message: Message) -> None:
        job = self._job(message.message)
        if self._with_message:
            await self._function(job, message)
        else:
            await self._function(job)


def as_processor(handler: Handler) -> Processor:
    return FunctionProcessor(handler)


def _is_processor(value: Any) -> bool:
    return callable(getattr(value, "validate", None)) and _is_async(value)


async def from_factory(factory: Factory, resources: Resources, name: str) -> Processor:
    """Calls a factory (awaiting it if async) and checks what it returned."""
    try:
        result = factory.function(resources)
        if inspect.isawaitable(result):
            result = await result
    except Exception as error:  # noqa: BLE001 - reported as one line at start
        raise PluginError(
            f"{name}(resources) raised {type(error).__name__}: {_one_line(error)}"
        ) from None
    if _is_processor(result):
        processor: Processor = result
        return processor
    if not callable(result):
        raise PluginError(
            f"{name}(resources) returned {type(result).__name__}; a factory returns the "
            f"processor, e.g. an inner {HANDLER_EXAMPLE.format(name='send')}"
        )
    inner = getattr(result, "__name__", "send")
    inspected = inspect_target(
        result, f"{name}(resources)", inner if inner.isidentifier() else "send"
    )
    if isinstance(inspected, Factory):
        raise PluginError(
            f"{name}(resources) returned another factory; return the processor, e.g. an "
            f"inner {HANDLER_EXAMPLE.format(name='send')}"
        )
    return as_processor(inspected)
