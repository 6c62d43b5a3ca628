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
   ``PICKLE_EXT_CODE``, and a pickle is loaded ONLY at a position whose annotation calls
   for one: a type msgspec cannot encode (msgspec hands those to the ``dec_hook``). The
   ``ext_hook`` never unpickles: it wraps the data and counts it; the ``dec_hook`` of an
   opaque position claims it (and unpickles it, then checks it with isinstance). A
   pickle left unclaimed (under ``Any``, ``object``, or wherever msgspec would have
   passed it through) makes the decoding fail with :class:`PickleRefused`, and nothing
   was unpickled for it. Types without ``Any`` or custom classes cannot meet an
   extension value at all (msgspec refuses it by type), so their decoders skip the count.
6. A caller builds its CallSpec from the signature rebuilt out of the publisher's type
   description (``_typespec``), never from a pickle; opaque positions there are
   :class:`OpaqueValue` stand-ins that take any value and validate nothing.
7. An ``int`` is Python's int. msgpack carries ints from -2**63 to 2**64-1; a larger one
   travels as msgpack extension type ``BIG_INT_EXT_CODE`` (2, never the pickle code)
   holding the int's minimal two's-complement big-endian bytes: ``int.from_bytes`` reads
   it back, nothing is unpickled or run. The usual path pays nothing for it. Encoding
   tries the plain encode, and only on msgspec's ``OverflowError`` redoes it with the big
   ints swapped for extension values (:func:`encode_with_big_ints`). Typed decoding
   refuses an extension value at an ``int`` position (msgspec checks the type before any
   ``ext_hook``: "Expected `int`, got `ext`"); only then is the payload decoded untyped,
   each big int read back, and the value validated with ``msgspec.convert`` against the
   same type (:func:`decode_with_big_ints`), which takes a big int wherever an int goes,
   makes it a float where a float goes ("Number out of range" past a float's range) and
   refuses it for ``str``, ``bool`` and the rest. Under ``Any`` the ``ext_hook`` itself
   reads a big int back. Bytes rather than decimal digits: 2.3x smaller, linear time, and
   ``int(str)`` refuses more than 4,300 digits (``sys.set_int_max_str_digits``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import inspect
import keyword
import sys
import threading
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

import cloudpickle
import msgspec
import msgspec.inspect as mi

from .. import _pickling
from .._exceptions import ConfigError, NotScatterable, ValidationError
from ._registry import check_name
from ._typespec import OpaqueValue, StreamKind, stream_of

PICKLE_EXT_CODE = 1
BIG_INT_EXT_CODE = 2  # an int beyond msgpack's 64 bits (rule 7); never a pickle

_UNSET: Any = object()  # default of optional parameters in generated binders

_MIN_INT64 = -(2**63)
_MAX_UINT64 = 2**64 - 1


class _BigInt:
    """An int beyond 64 bits, for the encoder's hook. Hashable (``Ext`` is not): a big
    int may be a dict key."""

    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value

    def __hash__(self) -> int:
        return hash(self.value)


def big_int_ext(value: int) -> msgspec.msgpack.Ext:
    """``value`` as extension type ``BIG_INT_EXT_CODE``: minimal two's-complement bytes."""
    data = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
    return msgspec.msgpack.Ext(BIG_INT_EXT_CODE, data)


def _big_int_of(data: memoryview) -> int:
    return int.from_bytes(data, "big", signed=True)


def _enc_hook(obj: object) -> msgspec.msgpack.Ext:
    if type(obj) is _BigInt:
        return big_int_ext(obj.value)
    # Anything msgspec cannot encode natively (numpy arrays, user classes) goes by value.
    try:
        return msgspec.msgpack.Ext(PICKLE_EXT_CODE, _pickling.dumps(obj))
    except Exception as exc:
        raise TypeError(f"cannot serialize a value of type {type(obj).__qualname__}: {exc}") from exc


class PickleRefused(msgspec.ValidationError):
    """A pickle (an extension value) at a position whose annotation does not call for one."""


class _ExtValue:
    """An extension value as decoded: its data, not unpickled."""

    __slots__ = ("code", "data")

    def __init__(self, code: int, data: memoryview) -> None:
        self.code = code
        self.data = data


class _Tally(threading.local):
    def __init__(self) -> None:
        self.unclaimed = 0  # extension values decoded and not claimed by an opaque position
        self.big_ints = 0  # big ints read back by decode_with_big_ints's untyped decoding


_tally = _Tally()


def _counting_ext_hook(code: int, data: memoryview) -> object:
    if code == BIG_INT_EXT_CODE:  # under Any: an int, read back here (rule 7)
        return _big_int_of(data)
    _tally.unclaimed += 1
    return _ExtValue(code, data)


def _refusing_ext_hook(code: int, data: memoryview) -> object:
    # Decoders whose type has no Any and no custom class: msgspec refuses an extension
    # value by type before it would get here; this is the belt to those braces.
    if code == BIG_INT_EXT_CODE:
        return _big_int_of(data)
    raise PickleRefused("a pickled value (msgpack extension type) where none is expected")


def _untyped_ext_hook(code: int, data: memoryview) -> object:
    if code == BIG_INT_EXT_CODE:
        _tally.big_ints += 1
        return _big_int_of(data)
    _tally.unclaimed += 1
    return _ExtValue(code, data)


def _claim(value: _ExtValue) -> memoryview:
    _tally.unclaimed -= 1
    if value.code != PICKLE_EXT_CODE:
        raise TypeError(f"unknown msgpack extension type {value.code}")
    return value.data


def _is_opaque_stand_in(expected: Any) -> bool:
    return isinstance(expected, type) and issubclass(expected, OpaqueValue)


def _unpickling_dec_hook(expected: Any, obj: object) -> object:
    """An opaque position (a type msgspec cannot encode): the one place a pickle is loaded."""
    if expected is object:  # takes anything, so it calls for nothing: a pickle stays unclaimed
        return obj
    if type(obj) is _ExtValue:
        obj = cloudpickle.loads(_claim(obj))
    if _is_opaque_stand_in(expected):
        return obj  # a caller's stand-in: nothing to check the value against here
    return _check_instance(expected, obj)


def _validating_dec_hook(expected: Any, obj: object) -> object:
    """As :func:`_unpickling_dec_hook`, without loading the pickle (the caller's own
    arguments, which it only validates; finding which parameter holds a stray pickle)."""
    if expected is object:
        return obj
    if type(obj) is _ExtValue:
        _claim(obj)
        return obj
    if _is_opaque_stand_in(expected):
        return obj
    return _check_instance(expected, obj)


def _pickle_refusing_dec_hook(expected: Any, obj: object) -> object:
    """For callers whose role may not send pickles (call-only): an opaque position that
    holds one refuses it, unloaded; everything else decodes as for anyone."""
    if type(obj) is _ExtValue:
        _claim(obj)
        raise PickleRefused("a pickled value from a client whose secret is call-only")
    if expected is object or _is_opaque_stand_in(expected):
        return obj
    return _check_instance(expected, obj)


def _check_instance(expected: Any, obj: object) -> object:
    # The value arrived through the pickle extension (or as plain data); check it is what
    # the annotation says.
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

# What msgpack carries as itself: to_builtins leaves these for the encoder, so that the
# fallback encodes every other value to the very bytes ENCODER makes; convert refuses a
# str for them (no base64 bytes), as typed msgpack decoding does.
_PASSED_THROUGH = (bytes, bytearray, memoryview, datetime.datetime, msgspec.msgpack.Ext)
_NATIVE_INPUTS = (bytes, bytearray, memoryview)


def _swap_big_ints(obj: Any) -> Any:
    kind = type(obj)
    if kind is dict:
        return {_swap_big_ints(k): _swap_big_ints(v) for k, v in obj.items()}
    if kind is list or kind is tuple:
        return [_swap_big_ints(item) for item in obj]
    if isinstance(obj, int) and kind is not bool and not _MIN_INT64 <= obj <= _MAX_UINT64:
        return _BigInt(int(obj))
    return obj


def encode_with_big_ints(value: Any) -> bytes:
    """``ENCODER.encode(value)`` for a value holding ints beyond 64 bits (rule 7).

    ``to_builtins`` first flattens Structs, dataclasses, enums and the rest exactly as the
    encoder would (custom classes go through the same pickling hook), then the big ints
    are swapped for stand-ins the encoder's hook writes as ``BIG_INT_EXT_CODE``.
    """
    plain = msgspec.to_builtins(value, builtin_types=_PASSED_THROUGH, enc_hook=_enc_hook)
    return ENCODER.encode(_swap_big_ints(plain))


_UNTYPED = msgspec.msgpack.Decoder(ext_hook=_untyped_ext_hook)
_NO_BIG_INTS: Any = object()


def decode_with_big_ints(type_: Any, payload: Any, *, unpickle: bool) -> Any:
    """Decode ``payload`` as ``type_`` where typed decoding met an extension value (rule 7).

    Untyped decoding reads each big int back; ``msgspec.convert`` then validates the
    whole value against ``type_`` as typed decoding would, with the same hooks and the
    same count of unclaimed pickles (rule 5). Returns ``_NO_BIG_INTS`` if the payload holds
    none: the typed decoder's error stands then.
    """
    hook = _unpickling_dec_hook if unpickle else _validating_dec_hook
    tally = _tally
    outer = tally.unclaimed, tally.big_ints
    tally.unclaimed = tally.big_ints = 0
    try:
        try:
            plain = _UNTYPED.decode(payload)
        except msgspec.DecodeError:
            return _NO_BIG_INTS
        if not tally.big_ints:
            return _NO_BIG_INTS
        try:
            value = msgspec.convert(plain, type_, dec_hook=hook, builtin_types=_NATIVE_INPUTS)
        except msgspec.ValidationError as exc:
            if "`_ExtValue`" not in str(exc):
                raise
            # Worded as typed decoding words an extension value where none may go.
            raise msgspec.ValidationError(str(exc).replace("`_ExtValue`", "`ext`")) from None
        unclaimed = tally.unclaimed
    finally:
        tally.unclaimed, tally.big_ints = outer
    if unclaimed:
        raise PickleRefused(
            "a pickled value (msgpack extension type) where the annotation does not call for "
            "one; it was not unpickled"
        )
    return value


def _met_an_extension(exc: msgspec.ValidationError) -> bool:
    """The typed decoder refused an extension value by type: perhaps a big int."""
    return "got `ext`" in str(exc)


def meets_pickles(type_: Any) -> bool:
    """True if decoding ``type_`` may meet an extension value: it holds Any or a custom class."""
    try:
        stack: list[Any] = [mi.type_info(type_)]
    except Exception:
        return True
    seen: set[int] = set()
    while stack:
        info = stack.pop()
        if id(info) in seen:
            continue
        seen.add(id(info))
        if isinstance(info, mi.AnyType | mi.CustomType):
            return True
        for name in info.__struct_fields__:
            value = getattr(info, name)
            if isinstance(value, mi.Type):
                stack.append(value)
            elif isinstance(value, tuple):  # of types, of fields, or of Literal values
                for item in value:
                    if isinstance(item, mi.Field):
                        stack.append(item.type)
                    elif isinstance(item, mi.Type):
                        stack.append(item)
    return False


def _guarded(decode: Callable[[Any], Any], payload: Any) -> Any:
    tally = _tally
    outer = tally.unclaimed  # a decoding inside an unpickling one keeps its own count
    tally.unclaimed = 0
    try:
        value = decode(payload)
        unclaimed = tally.unclaimed
    finally:
        tally.unclaimed = outer
    if unclaimed:
        raise PickleRefused(
            "a pickled value (msgpack extension type) where the annotation does not call for "
            "one; it was not unpickled"
        )
    return value


def decoding(type_: Any, *, unpickle: bool) -> Callable[[Any], Any]:
    """``decode(payload)`` validating against ``type_`` (rule 5).

    ``unpickle``: load the pickles at opaque positions (else only validate them: a
    caller's own arguments). Raises TypeError if msgspec cannot validate ``type_``.
    """
    hook = _unpickling_dec_hook if unpickle else _validating_dec_hook
    return _decoder(type_, hook)


def answer_decoding(type_: Any, *, load_pickles: bool) -> Callable[[Any], Any]:
    """``decode(payload)`` of what a callee sends back (a result, a stream's item): the
    pickles at opaque positions loaded, or, for a call-only caller, refused unloaded."""
    return decoding(type_, unpickle=True) if load_pickles else refusing_pickles(type_)


def refusing_pickles(type_: Any) -> Callable[[Any], Any]:
    """``decode(payload)`` as :func:`decoding` does, but a pickle anywhere is refused
    (``PickleRefused``), never loaded: for the arguments of a call-only client."""
    return _decoder(type_, _pickle_refusing_dec_hook)


def _decoder(type_: Any, hook: Callable[[Any, object], object]) -> Callable[[Any], Any]:
    if not meets_pickles(type_):
        return msgspec.msgpack.Decoder(type_, dec_hook=hook, ext_hook=_refusing_ext_hook).decode
    decoder = msgspec.msgpack.Decoder(type_, dec_hook=hook, ext_hook=_counting_ext_hook)
    decode = decoder.decode

    def guarded(payload: Any) -> Any:
        return _guarded(decode, payload)

    return guarded


def signature_of(fn: Callable[..., Any]) -> inspect.Signature:
    """The signature with string annotations evaluated, or NotScatterable."""
    try:
        return inspect.signature(fn, eval_str=True)
    except (NameError, SyntaxError, TypeError) as exc:
        raise NotScatterable(f"cannot read the annotations of {fn!r}: {exc}") from exc
    except ValueError as exc:
        raise NotScatterable(f"{fn!r} has no Python signature to ship: {exc}") from exc


def check_scatterable(fn: object, name: object) -> inspect.Signature:
    """Refuse, with a message saying what to do, anything that cannot become a remote function.

    ``name`` is the one it would get by default (its ``__name__``): an explicit name was
    checked already, with ``check_name``'s own errors.
    """
    if not callable(fn):
        raise NotScatterable(f"@scatter needs a function, got {type(fn).__qualname__}")
    if isinstance(fn, type):
        raise NotScatterable(
            f"@scatter takes plain functions, not classes ({fn.__qualname__}); "
            "scatter a function that builds or uses it"
        )
    try:
        name = check_name(name)
    except (TypeError, ConfigError) as exc:
        raise NotScatterable(
            f"not a usable function name: {exc}; give it one with name='a_name'"
        ) from None
    sig = signature_of(fn)
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        streams, _ = stream_of(sig.return_annotation)
        wanted = "async" if inspect.isasyncgenfunction(fn) else "sync"
        if streams != wanted:
            shape = "AsyncIterator[T]" if wanted == "async" else "Iterator[T]"
            raise NotScatterable(
                f"{name}() is a{'n async' if wanted == 'async' else ''} generator: annotate "
                f"its return as {shape} (from collections.abc or typing) and callers get "
                f"each item as it is produced, validated as T; got "
                f"{_type_name(sig.return_annotation)}"
            )
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
    """Undo :func:`portable_signature` in a node's worker that unpickled it.

    Only a worker does: it loads the publisher's code anyway. A caller never unpickles a
    signature; it rebuilds one from the type description (rule 6).
    """
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


_signature_id = signature_id  # build_call_spec has a parameter of that name


def _param_type(p: inspect.Parameter) -> Any:
    annotation = Any if p.annotation is inspect.Parameter.empty else p.annotation
    if p.kind is inspect.Parameter.VAR_POSITIONAL:
        return tuple[annotation, ...]  # type: ignore[valid-type]
    if p.kind is inspect.Parameter.VAR_KEYWORD:
        return dict[str, annotation]  # type: ignore[valid-type]
    return annotation


def _return_type(sig: inspect.Signature) -> Any:
    """The type a result is validated as: of one item for a function that streams."""
    annotation = sig.return_annotation
    if annotation is inspect.Signature.empty:
        return Any
    annotation = stream_of(annotation)[1]
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
    decode_args: Callable[[Any], Any]  # see decoding(): raises msgspec's errors
    decode_return: Callable[[Any], Any]
    invoke: Callable[[Callable[..., Any], dict[str, Any]], Any]
    checks_return: bool
    arguments_type: Any
    return_type: Any
    # msgspec.convert checks these arguments as strictly as decoding would (rule 4's
    # exception): no dataclass, Struct or NamedTuple instance, which convert lets through,
    # and no Any or custom class, under which convert would pass a pickle along.
    converts: bool
    parameter_types: dict[str, Any] = field(default_factory=dict)  # {name: decoded type}
    unpickles_arguments: bool = True  # a node's spec; a caller's only validates (rule 6)
    # "" for a plain function; "sync" / "async": a generator, whose calls stream items
    # of return_type (the item type T of its Iterator[T] / AsyncIterator[T] annotation).
    streams: StreamKind = ""

    def encode_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        """Bind (Python's TypeError on bad arity), validate and encode (rule 4)."""
        arguments = self.bind(*args, **kwargs)
        try:
            payload = ENCODER.encode(arguments)
        except OverflowError:  # an int beyond 64 bits (rule 7)
            try:
                payload = encode_with_big_ints(arguments)
            except TypeError as exc:
                raise ValidationError(f"{self.name}(): {exc}") from exc
        except TypeError as exc:
            raise ValidationError(f"{self.name}(): {exc}") from exc
        if self.converts and len(payload) > _CONVERT_ABOVE_BYTES:
            # Decoding allocates every value again (1,000 floats: ~80 us in a call's loop
            # against ~30 us for convert, measured with cluster/bench.py's `total`), while
            # convert's fixed cost (~2 us) loses to decoding for small arguments.
            try:
                msgspec.convert(arguments, self.arguments_type)
            except msgspec.ValidationError as exc:
                raise argument_error(self.name, exc) from None
        else:
            self.decode_arguments(payload)
        return payload

    def decode_arguments(self, payload: bytes | memoryview) -> dict[str, Any]:
        try:
            arguments: dict[str, Any] = self.decode_args(payload)
        except PickleRefused:
            raise self._stray_pickle(payload) from None
        except msgspec.ValidationError as exc:
            return self._decode_arguments_slowly(payload, exc)
        return arguments

    def _decode_arguments_slowly(
        self, payload: bytes | memoryview, exc: msgspec.ValidationError
    ) -> dict[str, Any]:
        """Where typed decoding failed: the big-int fallback (rule 7), else its error."""
        try:
            if not _met_an_extension(exc):
                raise exc
            arguments: dict[str, Any] = decode_with_big_ints(
                self.arguments_type, payload, unpickle=self.unpickles_arguments
            )
            if arguments is _NO_BIG_INTS:
                raise exc
        except PickleRefused:
            raise self._stray_pickle(payload) from None
        except msgspec.ValidationError as error:
            raise argument_error(self.name, error) from None
        return arguments

    def _stray_pickle(self, payload: bytes | memoryview) -> ValidationError:
        """The error for a pickle where no annotation calls for one, naming its parameter.

        Off the call path: each argument is decoded again on its own, validating only,
        so nothing is unpickled to find it.
        """
        try:
            raw: dict[str, msgspec.Raw] = _RAW_ARGUMENTS.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raw = {}
        for parameter, value in raw.items():
            type_ = self.parameter_types.get(parameter)
            if type_ is None:
                continue
            try:
                decoding(type_, unpickle=False)(value)
            except PickleRefused:
                annotation = self.signature.parameters[parameter].annotation
                return ValidationError(
                    f"{self.name}() argument {parameter!r}: a pickled value (msgpack extension "
                    f"type {PICKLE_EXT_CODE}) where its annotation {_type_name(annotation)} "
                    "does not call for one; it was not unpickled. Only a type msgspec cannot "
                    "encode (a numpy array, a plain class) takes a pickled value.",
                    parameter=parameter,
                    path=f"$.{parameter}",
                )
            except Exception:
                continue
        return ValidationError(
            f"{self.name}() arguments: a pickled value where no annotation calls for one; "
            "it was not unpickled"
        )

    def _decode_return(self, payload: bytes | memoryview) -> Any:
        """``decode_return``, and the big-int fallback where it met an extension value."""
        try:
            return self.decode_return(payload)
        except PickleRefused:
            raise
        except msgspec.ValidationError as exc:
            if not _met_an_extension(exc):
                raise
            value = decode_with_big_ints(self.return_type, payload, unpickle=True)
            if value is _NO_BIG_INTS:
                raise exc from None
            return value

    def encode_result(self, value: Any) -> bytes:
        """Encode a result and check it against the return annotation."""
        try:
            try:
                payload = ENCODER.encode(value)
            except OverflowError:  # an int beyond 64 bits (rule 7)
                payload = encode_with_big_ints(value)
        except TypeError as exc:
            raise ValidationError(
                f"{self.name}() returned a value that cannot be sent: {exc}", parameter="return"
            ) from exc
        if self.checks_return:
            try:
                self._decode_return(payload)
            except msgspec.ValidationError as exc:
                raise ValidationError(
                    f"{self.name}() returned a value that does not match its return "
                    f"annotation {_type_name(self.signature.return_annotation)}: {exc}",
                    parameter="return",
                    path=_path_of(exc),
                ) from None
        return payload

    def encode_reply(
        self, tag: int, call_id: int, version: int, value: Any, output: Any = None
    ) -> bytes:
        """A whole ``Result`` message in one encoding pass, the result checked first.

        ``_wire.Result`` is an array-like tagged Struct, so ``(tag, id, version, value)``
        (with ``output`` after, if the call wrote any) decodes as one;
        ``test_one_pass_reply_is_a_result_on_the_wire`` holds the two together. Results of
        plain builtin types are checked with a type test; anything else takes the
        encode-and-decode path of :meth:`encode_result`.
        """
        expected = _PLAIN_RESULT_TYPES.get(self.return_type)
        if expected is not None and type(value) in expected:
            try:
                if output:
                    return ENCODER.encode((tag, call_id, version, value, output))
                return ENCODER.encode((tag, call_id, version, value))
            except OverflowError:  # an int beyond 64 bits: encoded and checked below
                pass
        payload = self.encode_result(value)
        if output:
            return ENCODER.encode((tag, call_id, version, msgspec.Raw(payload), output))
        return ENCODER.encode((tag, call_id, version, msgspec.Raw(payload)))

    def decode_result(self, payload: bytes | memoryview) -> Any:
        try:
            return self._decode_return(payload)
        except PickleRefused:
            raise ValidationError(
                f"{self.name}() result: a pickled value (msgpack extension type "
                f"{PICKLE_EXT_CODE}) was not unpickled: its return annotation "
                f"{_type_name(self.signature.return_annotation)} does not call for one, or "
                "this client holds a call-only secret, which never loads a pickle",
                parameter="return",
            ) from None
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


def build_call_spec(
    name: str,
    sig: inspect.Signature,
    *,
    caller: bool = False,
    signature_id: str | None = None,
    load_pickles: bool = True,
) -> CallSpec:
    """Prepare every per-call step of one version (rule 1).

    ``caller``: the spec of a caller, built from a rebuilt signature (rule 6): its own
    arguments are validated, never unpickled. ``signature_id``: the publisher's, which a
    rebuilt signature's text need not hash to. ``load_pickles``: False for a call-only
    caller, whose results never load a pickle (a refused one is a ValidationError).
    """
    fields: dict[str, Any] = {}
    parameter_types: dict[str, Any] = {}
    for p in sig.parameters.values():
        if not p.name.isidentifier() or keyword.iskeyword(p.name):
            raise NotScatterable(f"{name}(): {p.name!r} is not a parameter name")
        t = _param_type(p)
        parameter_types[p.name] = t
        optional = p.default is not inspect.Parameter.empty or p.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        )
        fields[p.name] = NotRequired[t] if optional else t
    binder_name = name if name.isidentifier() and not keyword.iskeyword(name) else "function"
    arguments_type = TypedDict(f"{binder_name}_arguments", fields)  # type: ignore[misc]
    return_type = _return_type(sig)
    try:
        decode_args = decoding(arguments_type, unpickle=not caller)
        # A call-only caller never loads a pickle: the publisher chose what it would run.
        decode_return = answer_decoding(return_type, load_pickles=load_pickles)
    except TypeError as exc:
        raise NotScatterable(f"{name}(): msgspec cannot validate an annotation: {exc}") from exc
    return CallSpec(
        name=name,
        signature=sig,
        signature_id=signature_id or _signature_id(sig),
        bind=_make_binder(binder_name, sig),
        decode_args=decode_args,
        decode_return=decode_return,
        invoke=_make_invoker(sig),
        checks_return=return_type is not Any,
        arguments_type=arguments_type,
        return_type=return_type,
        converts=not meets_pickles(arguments_type)
        and all(_convert_validates(t, set()) for t in fields.values()),
        parameter_types=parameter_types,
        unpickles_arguments=not caller,
        streams=stream_of(sig.return_annotation)[0],
    )


_RAW_ARGUMENTS = msgspec.msgpack.Decoder(dict[str, msgspec.Raw])


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
    "BIG_INT_EXT_CODE",
    "ENCODER",
    "PICKLE_EXT_CODE",
    "CallSpec",
    "PickleRefused",
    "argument_error",
    "build_call_spec",
    "check_scatterable",
    "content_id",
    "decode_with_big_ints",
    "decoding",
    "encode_with_big_ints",
    "meets_pickles",
    "refusing_pickles",
    "signature_id",
    "signature_of",
    "signature_text",
    "source_of",
]
