"""Annotations to msgspec types, and the argument checks shared by client and node.

Rules of this module:

1. A function's signature becomes a ``CallSpec`` ONCE per version, on the client (when a
   callable is made or refreshed) and on the node (when a worker loads the version). Every
   per-call step is prepared here: a binder, an encoder, typed decoders, an invoker.
   Nothing on a call's path parses annotations or walks ``inspect.Signature``.
2. Binding is done by a generated Python function with the same parameter list as the
   original, so wrong arity and unknown keywords raise the ``TypeError`` the interpreter
   itself words for a local call (``add() missing 1 required positional argument: 'c'``).
3. Arguments travel as one msgpack map ``{parameter: value}`` holding only what the caller
   passed; defaults are applied by Python on the node, never serialized. ``*args`` travels
   as an array under its parameter's name, ``**kwargs`` as a map.
4. Validation is decoding: the client encodes the arguments, then decodes them with the
   same typed decoder the node uses. Both sides therefore accept exactly the same values
   (``msgspec.convert`` would let a dataclass instance through unchecked).
5. cloudpickle carries only what msgspec cannot encode, as msgpack extension type
   ``PICKLE_EXT_CODE``; a decoded value of a custom class is then checked with isinstance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import keyword
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

import cloudpickle
import msgspec

from .. import _pickling
from .._exceptions import NotScatterable, ValidationError

PICKLE_EXT_CODE = 1

_UNSET: Any = object()  # default of optional parameters in generated binders


def _enc_hook(obj: object) -> msgspec.msgpack.Ext:
    # Anything msgspec cannot encode natively (numpy arrays, user classes) goes by value.
    try:
        return msgspec.msgpack.Ext(PICKLE_EXT_CODE, _pickling.dumps(obj))
    except Exception as exc:
        raise TypeError(f"cannot serialize a value of type {type(obj).__qualname__}: {exc}") from exc


def _ext_hook(code: int, data: memoryview) -> object:
    if code != PICKLE_EXT_CODE:
        raise TypeError(f"unknown msgpack extension type {code}")
    return cloudpickle.loads(data)


def _dec_hook(expected: Any, obj: object) -> object:
    # Called for annotations msgspec does not know (user classes): the value arrived
    # through the pickle extension; check it is what the annotation says.
    if isinstance(expected, type) and not isinstance(obj, expected):
        # The same class can exist twice in a process: rebuilt by value from the shipped
        # signature, and imported by reference along with a value. Same module and
        # qualified name is the same class as far as the caller can tell, and msgspec
        # wants an instance of the annotation's class object, so the value is rebound.
        kind = type(obj)
        if kind.__qualname__ != expected.__qualname__ or kind.__module__ != expected.__module__:
            raise TypeError(f"Expected `{expected.__qualname__}`, got `{kind.__qualname__}`")
        try:
            obj.__class__ = expected
        except TypeError:
            raise TypeError(
                f"Expected `{expected.__qualname__}`, got an incompatible class of that name"
            ) from None
    return obj


ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def typed_decoder(type_: Any) -> msgspec.msgpack.Decoder[Any]:
    """A msgpack decoder validating against ``type_``, with the pickle extension wired in."""
    return msgspec.msgpack.Decoder(type_, dec_hook=_dec_hook, ext_hook=_ext_hook)


def signature_of(fn: Callable[..., Any]) -> inspect.Signature:
    """The signature with string annotations evaluated, or NotScatterable."""
    try:
        return inspect.signature(fn, eval_str=True)
    except (NameError, SyntaxError, TypeError) as exc:
        raise NotScatterable(f"cannot read the annotations of {fn!r}: {exc}") from exc
    except ValueError as exc:
        raise NotScatterable(f"{fn!r} has no Python signature to ship: {exc}") from exc


def check_scatterable(fn: object, name: str) -> inspect.Signature:
    """Refuse, with a message saying what to do, anything that cannot become a remote function."""
    if not callable(fn):
        raise NotScatterable(f"@scatter needs a function, got {type(fn).__qualname__}")
    if isinstance(fn, type):
        raise NotScatterable(
            f"@scatter takes plain functions, not classes ({fn.__qualname__}); "
            "scatter a function that builds or uses it"
        )
    if not (name.isidentifier() and not keyword.iskeyword(name)):
        raise NotScatterable(
            f"{name!r} is not a usable function name; pass @scatter(name='a_name')"
        )
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise NotScatterable(
            f"{name}() is a generator: its results cannot be streamed back; "
            "return a list (or another container) instead"
        )
    if inspect.iscoroutinefunction(fn):
        raise NotScatterable(
            f"{name}() is a coroutine function; scatter a plain def function "
            "(callers can still await it with .call_async)"
        )
    sig = signature_of(fn)
    missing = [
        p.name for p in sig.parameters.values() if p.annotation is inspect.Parameter.empty
    ]
    if sig.return_annotation is inspect.Signature.empty:
        missing.append("return")
    if missing:
        raise NotScatterable(
            f"{name}() needs annotations for: {', '.join(missing)}. Scatter validates every "
            "argument and result; annotate them (typing.Any opts a value out of validation)"
        )
    for p in sig.parameters.values():
        if p.default is not inspect.Parameter.empty:
            try:
                cloudpickle.dumps(p.default)
            except Exception as exc:
                raise NotScatterable(
                    f"default of parameter {p.name!r} of {name}() cannot be shipped: {exc}"
                ) from exc
    return sig


def _classes_with_string_annotations(
    annotation: Any, found: dict[type, dict[str, Any]], seen: set[int]
) -> None:
    if id(annotation) in seen:
        return
    seen.add(id(annotation))
    for arg in typing.get_args(annotation):
        _classes_with_string_annotations(arg, found, seen)
    if not isinstance(annotation, type) or annotation.__module__ == "builtins":
        return
    raw = inspect.get_annotations(annotation)
    if not raw:
        return
    try:
        hints = typing.get_type_hints(annotation, include_extras=True)
    except Exception:  # a class whose hints do not resolve here either: leave it to msgspec
        return
    if any(isinstance(value, str) for value in raw.values()):
        found[annotation] = hints
    for hint in hints.values():
        _classes_with_string_annotations(hint, found, seen)


def portable_signature(sig: inspect.Signature) -> tuple[inspect.Signature, dict[type, dict[str, Any]]]:
    """The signature plus the resolved annotations of classes it uses.

    Under ``from __future__ import annotations`` a dataclass or Struct keeps its field
    types as strings, resolved against its module's globals. A node (or another client)
    that rebuilds the class by value has no such module, so the types resolved here, in
    the defining process, travel with the signature; see :func:`restore_signature`.
    """
    found: dict[type, dict[str, Any]] = {}
    seen: set[int] = set()
    for p in sig.parameters.values():
        _classes_with_string_annotations(p.annotation, found, seen)
    _classes_with_string_annotations(sig.return_annotation, found, seen)
    return sig, found


def restore_signature(shipped: Any) -> inspect.Signature:
    """Undo :func:`portable_signature` in a process that unpickled it."""
    if isinstance(shipped, inspect.Signature):
        return shipped
    sig, fixups = shipped
    for cls, hints in fixups.items():
        module = sys.modules.get(cls.__module__)
        if module is not None and getattr(module, cls.__qualname__, None) is cls:
            continue  # the class's own module is here: its strings resolve as written
        cls.__annotations__ = dict(hints)
    restored: inspect.Signature = sig
    return restored


def signature_text(sig: inspect.Signature) -> str:
    return str(sig)


def signature_id(sig: inspect.Signature) -> str:
    """A stable id of the calling contract: parameter names, kinds, annotations, defaults."""
    return hashlib.sha256(signature_text(sig).encode()).hexdigest()[:16]


def _param_type(p: inspect.Parameter) -> Any:
    annotation = Any if p.annotation is inspect.Parameter.empty else p.annotation
    if p.kind is inspect.Parameter.VAR_POSITIONAL:
        return tuple[annotation, ...]  # type: ignore[valid-type]
    if p.kind is inspect.Parameter.VAR_KEYWORD:
        return dict[str, annotation]  # type: ignore[valid-type]
    return annotation


def _return_type(sig: inspect.Signature) -> Any:
    annotation = sig.return_annotation
    if annotation is inspect.Signature.empty:
        return Any
    return type(None) if annotation is None else annotation


def _make_binder(name: str, sig: inspect.Signature) -> Callable[..., dict[str, Any]]:
    """Generate ``def name(<same parameters>): return {passed arguments}``.

    Arguments left to their defaults and empty ``*args`` / ``**kwargs`` are not put in
    the map: defaults are applied by Python on the node, and nothing costs bytes for free.
    """
    parts: list[str] = []
    required: list[str] = []
    conditional: list[str] = []
    saw_positional_only = False
    saw_star = False
    for p in sig.parameters.values():
        kind = p.kind
        if kind is not inspect.Parameter.POSITIONAL_ONLY and saw_positional_only:
            parts.append("/")
            saw_positional_only = False
        if kind is inspect.Parameter.POSITIONAL_ONLY:
            saw_positional_only = True
        if kind is inspect.Parameter.KEYWORD_ONLY and not saw_star:
            parts.append("*")
            saw_star = True
        if kind is inspect.Parameter.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            saw_star = True
            conditional.append(f"    if {p.name}: arguments[{p.name!r}] = {p.name}")
        elif kind is inspect.Parameter.VAR_KEYWORD:
            parts.append(f"**{p.name}")
            conditional.append(f"    if {p.name}: arguments[{p.name!r}] = {p.name}")
        elif p.default is not inspect.Parameter.empty:
            parts.append(f"{p.name}=_UNSET")
            conditional.append(
                f"    if {p.name} is not _UNSET: arguments[{p.name!r}] = {p.name}"
            )
        else:
            parts.append(p.name)
            required.append(f"{p.name!r}: {p.name}")
    if saw_positional_only:
        parts.append("/")
    lines = [f"def {name}({', '.join(parts)}):"]
    literal = "{" + ", ".join(required) + "}"
    if conditional:
        lines += [f"    arguments = {literal}", *conditional, "    return arguments"]
    else:
        lines.append(f"    return {literal}")
    namespace: dict[str, Any] = {"_UNSET": _UNSET}
    exec(compile("\n".join(lines) + "\n", f"<scatter binder for {name}>", "exec"), namespace)
    binder: Callable[..., dict[str, Any]] = namespace[name]
    return binder


def _make_invoker(sig: inspect.Signature) -> Callable[[Callable[..., Any], dict[str, Any]], Any]:
    params = list(sig.parameters.values())
    kinds = {p.kind for p in params}
    positional_only = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    positional_or_keyword = [
        p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    var_positional = next(
        (p.name for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL), None
    )
    var_keyword = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if not kinds & {
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    }:
        return lambda fn, arguments: fn(**arguments)

    def invoke(fn: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        args = [arguments.pop(n) for n in positional_only if n in arguments]
        extra = arguments.pop(var_positional, ()) if var_positional else ()
        if extra:
            # Values for *args mean every positional parameter before it was passed
            # positionally, so they must be passed positionally again.
            args.extend(arguments.pop(n) for n in positional_or_keyword if n in arguments)
            args.extend(extra)
        more = arguments.pop(var_keyword, {}) if var_keyword else {}
        return fn(*args, **arguments, **more)

    return invoke


_CONVERT_ABOVE_BYTES = 512

# {return annotation: the value types that decode as it unchanged}: checked by type()
# instead of an encode-and-decode round trip. bool is not an int here, as for msgspec.
_PLAIN_RESULT_TYPES: dict[Any, tuple[type, ...]] = {
    int: (int,),
    float: (float, int),
    str: (str,),
    bytes: (bytes,),
    bool: (bool,),
    type(None): (type(None),),
}


@dataclass(frozen=True, slots=True)
class CallSpec:
    """Everything a call of one version needs, built once (rule 1)."""

    name: str
    signature: inspect.Signature
    signature_id: str
    bind: Callable[..., dict[str, Any]]
    args_decoder: msgspec.msgpack.Decoder[Any]
    return_decoder: msgspec.msgpack.Decoder[Any]
    invoke: Callable[[Callable[..., Any], dict[str, Any]], Any]
    checks_return: bool
    arguments_type: Any
    return_type: Any
    # msgspec.convert checks these arguments as strictly as decoding would (rule 4's
    # exception): no dataclass, Struct or NamedTuple instance, which convert lets through.
    converts: bool

    def encode_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        """Bind (Python's TypeError on bad arity), validate and encode (rule 4)."""
        arguments = self.bind(*args, **kwargs)
        try:
            payload = ENCODER.encode(arguments)
        except TypeError as exc:
            raise ValidationError(f"{self.name}(): {exc}") from exc
        if self.converts and len(payload) > _CONVERT_ABOVE_BYTES:
            # Decoding allocates every value again (1,000 floats: ~80 us in a call's loop
            # against ~30 us for convert, measured with cluster/bench.py's `total`), while
            # convert's fixed cost (~2 us) loses to decoding for small arguments.
            try:
                msgspec.convert(arguments, self.arguments_type, dec_hook=_dec_hook)
            except msgspec.ValidationError as exc:
                raise argument_error(self.name, exc) from None
        else:
            self.decode_arguments(payload)
        return payload

    def decode_arguments(self, payload: bytes | memoryview) -> dict[str, Any]:
        try:
            arguments: dict[str, Any] = self.args_decoder.decode(payload)
        except msgspec.ValidationError as exc:
            raise argument_error(self.name, exc) from None
        return arguments

    def encode_result(self, value: Any) -> bytes:
        """Encode a result and check it against the return annotation."""
        try:
            payload = ENCODER.encode(value)
        except TypeError as exc:
            raise ValidationError(
                f"{self.name}() returned a value that cannot be sent: {exc}", parameter="return"
            ) from exc
        if self.checks_return:
            try:
                self.return_decoder.decode(payload)
            except msgspec.ValidationError as exc:
                raise ValidationError(
                    f"{self.name}() returned a value that does not match its return "
                    f"annotation {_type_name(self.signature.return_annotation)}: {exc}",
                    parameter="return",
                    path=_path_of(exc),
                ) from None
        return payload

    def encode_reply(self, tag: int, call_id: int, version: int, value: Any) -> bytes:
        """A whole ``Result`` message in one encoding pass, the result checked first.

        ``_wire.Result`` is an array-like tagged Struct, so ``(tag, id, version, value)``
        encodes to the same bytes; ``test_one_pass_reply_is_a_result_on_the_wire`` holds
        the two together. Results of plain builtin types are checked with a type test;
        anything else takes the encode-and-decode path of :meth:`encode_result`.
        """
        expected = _PLAIN_RESULT_TYPES.get(self.return_type)
        if expected is not None and type(value) in expected:
            return ENCODER.encode((tag, call_id, version, value))
        payload = self.encode_result(value)
        return ENCODER.encode((tag, call_id, version, msgspec.Raw(payload)))

    def decode_result(self, payload: bytes | memoryview) -> Any:
        try:
            return self.return_decoder.decode(payload)
        except msgspec.ValidationError as exc:
            raise ValidationError(
                f"{self.name}() result does not match its return annotation: {exc}",
                parameter="return",
                path=_path_of(exc),
            ) from None


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__qualname__
    return repr(annotation).replace("typing.", "")


def _path_of(exc: msgspec.ValidationError) -> str | None:
    text = str(exc)
    marker = " - at `"
    if marker in text:
        return text.rsplit(marker, 1)[1].rstrip("`")
    return None


def argument_error(name: str, exc: msgspec.ValidationError) -> ValidationError:
    """Word a msgspec error as a Scatter one naming the parameter and the path."""
    path = _path_of(exc)
    parameter = None
    if path and path.startswith("$."):
        parameter = path[2:].split(".", 1)[0].split("[", 1)[0]
    reason = str(exc).split(" - at `", 1)[0]
    if parameter:
        where = f"argument {parameter!r}"
        if path != f"$.{parameter}":
            where += f" (at {path})"
        message = f"{name}() {where}: {reason}"
    else:
        message = f"{name}() arguments: {reason}"
    return ValidationError(message, parameter=parameter, path=path)


def build_call_spec(name: str, sig: inspect.Signature) -> CallSpec:
    """Prepare every per-call step of one version (rule 1)."""
    fields: dict[str, Any] = {}
    for p in sig.parameters.values():
        t = _param_type(p)
        optional = p.default is not inspect.Parameter.empty or p.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        )
        fields[p.name] = NotRequired[t] if optional else t
    binder_name = name if name.isidentifier() and not keyword.iskeyword(name) else "function"
    arguments_type = TypedDict(f"{binder_name}_arguments", fields)  # type: ignore[misc]
    return_type = _return_type(sig)
    try:
        args_decoder = typed_decoder(arguments_type)
        return_decoder = typed_decoder(return_type)
    except TypeError as exc:
        raise NotScatterable(f"{name}(): msgspec cannot validate an annotation: {exc}") from exc
    return CallSpec(
        name=name,
        signature=sig,
        signature_id=signature_id(sig),
        bind=_make_binder(binder_name, sig),
        args_decoder=args_decoder,
        return_decoder=return_decoder,
        invoke=_make_invoker(sig),
        checks_return=return_type is not Any,
        arguments_type=arguments_type,
        return_type=return_type,
        converts=all(_convert_validates(t, set()) for t in fields.values()),
    )


def _convert_validates(annotation: Any, seen: set[int]) -> bool:
    """False if ``annotation`` may hold an instance ``msgspec.convert`` does not look into."""
    if id(annotation) in seen:
        return True
    seen.add(id(annotation))
    if isinstance(annotation, type):
        if (
            dataclasses.is_dataclass(annotation)
            or issubclass(annotation, msgspec.Struct)
            or (issubclass(annotation, tuple) and hasattr(annotation, "_fields"))
            or hasattr(annotation, "__attrs_attrs__")
        ):
            return False
        if typing.is_typeddict(annotation):
            hints = typing.get_type_hints(annotation)
            return all(_convert_validates(t, seen) for t in hints.values())
    return all(_convert_validates(arg, seen) for arg in typing.get_args(annotation))


def content_id(body: bytes, sig: inspect.Signature) -> str:
    """The id of one body under one signature: never moves, safe to pin."""
    digest = hashlib.sha256(body)
    digest.update(b"\0")
    digest.update(signature_text(sig).encode())
    return digest.hexdigest()[:32]


def source_of(fn: Callable[..., Any]) -> str | None:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return None


__all__ = [
    "ENCODER",
    "PICKLE_EXT_CODE",
    "CallSpec",
    "argument_error",
    "build_call_spec",
    "check_scatterable",
    "content_id",
    "signature_id",
    "signature_of",
    "signature_text",
    "source_of",
    "typed_decoder",
]
