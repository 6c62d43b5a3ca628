"""Signatures as msgspec type descriptions: what a caller learns of a function, without code.

A caller never unpickles anything to learn a signature (DESIGN.md, "Security"). The
publisher describes its function's signature here, from msgspec's own view of each
annotation (``msgspec.inspect.type_info``), as a table of plain Structs encoded with
msgpack; the node stores those bytes and serves them in ``Description``; the caller
rebuilds, from them alone, types that validate the same wire shapes. Nothing in a
description is executed: its strings become class, field, member and parameter names
(checked to be identifiers wherever Python code is generated from them, as in the
binder) and its values are msgpack data. The node itself keeps validating against the
real annotations of the body it loads.

What a caller gets for each kind of annotation:

- builtins, containers (list, dict, tuple, set, frozenset), Optional/Union, Literal,
  datetime/date/time/timedelta, UUID, Decimal, bytes, ``Any`` and ``msgspec.Meta``
  constraints: the same types.
- ``enum.Enum``: an Enum of the same name, member names and values (an IntEnum,
  StrEnum, Flag or IntFlag where the original is one of those or mixes in int or str).
  Methods are not rebuilt.
- ``msgspec.Struct``: ``msgspec.defstruct`` with the same field names, encoded names,
  types, defaults, tag, tag field, ``array_like``, ``forbid_unknown_fields``,
  ``omit_defaults``, ``frozen``, ``eq`` and ``order``; all fields keyword-only when any
  of the original's is (an approximation when it mixes both kinds). Methods, ``__post_init__`` and class variables are not rebuilt,
  and a generic Struct (``Box[int]``) is rebuilt under its plain name.
- dataclasses and attrs classes: a Struct of the same name, fields and wire shape (a
  map). An approximation: its instances are Structs, not the original class, and carry
  none of its methods or ``__post_init__`` checks (the node, which has the real class,
  runs those).
- ``TypedDict``: a TypedDict with the same keys, types and required keys;
  ``NamedTuple``: a NamedTuple with the same fields, types and defaults, no methods.
- A class the caller's own process already has (same module and qualified name, found
  in an already imported module's namespace, never imported or looked up through
  ``__getattr__``) that describes identically is used as it is: a notebook that
  scattered a dataclass gets instances of that dataclass back.
- Anything msgspec cannot encode (a numpy array, a plain user class): a subclass of
  :class:`OpaqueValue` with the original's module and qualified name. The caller
  validates nothing about such a value and sends it pickled (msgpack extension type
  ``PICKLE_EXT_CODE``); the node validates it. A result at such a position is
  unpickled: the annotation calls for a pickle, so a caller trusts a function whose
  signature shows one to send a safe pickle.
- Defaults: msgpack data where msgspec encodes them (decoded against the rebuilt type),
  otherwise a :class:`HiddenDefault` showing the publisher's ``repr``. Defaults are
  applied by Python on the node; a caller only shows them. A Struct field's hidden
  default fills a field missing from a result with that stand-in.
"""

from __future__ import annotations

import collections.abc
import enum
import inspect
import keyword
import sys
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, NotRequired

import msgspec
import msgspec.inspect as mi

from .._exceptions import NotScatterable

FORMAT = 1  # of the description; a new one comes with a new protocol version
_MAX_REPR = 200


class _TakesAnything(type):
    # msgspec checks that what a dec_hook returns is an instance of the annotation: a
    # stand-in validates nothing, so everything is one.
    def __instancecheck__(cls, instance: Any) -> bool:
        return True


class OpaqueValue(metaclass=_TakesAnything):
    """Base of the caller's stand-ins for types msgspec cannot encode.

    Never instantiated. A position annotated with a subclass takes any value, sent as a
    pickle (msgpack extension type 1); the node checks it against the real class. Every
    object is an instance of a stand-in, for the same reason.
    """

    __slots__ = ()
    scatter_type: typing.ClassVar[str] = ""  # "module.QualifiedName" of the original


class HiddenDefault:
    """A default the caller cannot see (msgspec cannot encode it); the node applies it."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text or "<default>"


# -- the description -------------------------------------------------------------------


class Constraints(msgspec.Struct, frozen=True, omit_defaults=True):
    """``msgspec.Meta`` constraints of a type, as msgspec reports them."""

    gt: int | float | None = None
    ge: int | float | None = None
    lt: int | float | None = None
    le: int | float | None = None
    multiple_of: int | float | None = None
    pattern: str | None = None
    min_length: int | None = None
    max_length: int | None = None
    tz: bool | None = None


class _Node(msgspec.Struct, frozen=True, omit_defaults=True, tag_field="kind"):
    pass


PrimName = Literal[
    "any",
    "object",
    "none",
    "bool",
    "int",
    "float",
    "str",
    "bytes",
    "bytearray",
    "memoryview",
    "datetime",
    "date",
    "time",
    "timedelta",
    "uuid",
    "decimal",
    "ext",
    "raw",
]


class Prim(_Node, frozen=True, tag="prim"):
    name: PrimName
    constraints: Constraints | None = None


class Collection(_Node, frozen=True, tag="collection"):
    of: Literal["list", "set", "frozenset", "vartuple"]
    item: int  # index into SignatureSpec.types, as every child below
    constraints: Constraints | None = None


class TupleOf(_Node, frozen=True, tag="tuple"):
    items: list[int]


class DictOf(_Node, frozen=True, tag="dict"):
    key: int
    value: int
    constraints: Constraints | None = None


class UnionOf(_Node, frozen=True, tag="union"):
    members: list[int]


class LiteralOf(_Node, frozen=True, tag="literal"):
    values: list[bool | int | str | None]


class EnumOf(_Node, frozen=True, tag="enum"):
    module: str
    qualname: str
    flavor: Literal["plain", "int", "str", "flag", "intflag"]
    members: list[tuple[str, int | str]]


class FieldSpec(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    type: int
    required: bool = True
    encode_name: str = ""  # "": the field's name
    default: bytes | None = None  # msgpack of the default (or of what its factory makes)
    default_repr: str = ""
    factory: bool = False  # the default is made anew for each instance


class RecordOf(_Node, frozen=True, tag="record"):
    """A msgspec Struct, a dataclass or an attrs class."""

    module: str
    qualname: str
    origin: Literal["struct", "dataclass", "attrs"]
    fields: list[FieldSpec]
    tag_field: str | None = None
    tag: str | int | None = None
    array_like: bool = False
    forbid_unknown_fields: bool = False
    omit_defaults: bool = False
    frozen: bool = False
    eq: bool = True
    order: bool = False
    kw_only: bool = False  # some field of the original is keyword-only


class TypedDictOf(_Node, frozen=True, tag="typeddict"):
    module: str
    qualname: str
    fields: list[FieldSpec]


class NamedTupleOf(_Node, frozen=True, tag="namedtuple"):
    module: str
    qualname: str
    fields: list[FieldSpec]


class OpaqueOf(_Node, frozen=True, tag="opaque"):
    """A type msgspec cannot encode: its values travel pickled."""

    module: str
    qualname: str


TypeNode = (
    Prim
    | Collection
    | TupleOf
    | DictOf
    | UnionOf
    | LiteralOf
    | EnumOf
    | RecordOf
    | TypedDictOf
    | NamedTupleOf
    | OpaqueOf
)

ParameterKind = Literal[
    "POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD", "VAR_POSITIONAL", "KEYWORD_ONLY", "VAR_KEYWORD"
]


class ParameterSpec(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    kind: ParameterKind
    type: int  # of one item for *args, of one value for **kwargs (as annotated)
    has_default: bool = False
    default: bytes | None = None  # None with has_default: the caller cannot see it
    default_repr: str = ""


class SignatureSpec(msgspec.Struct, frozen=True, omit_defaults=True):
    format: int
    types: list[TypeNode]
    parameters: list[ParameterSpec]
    returns: int  # of one item, for a function that streams
    streams: StreamKind = ""  # "sync": returns Iterator[returns]; "async": AsyncIterator


# A generator function streams its items (scatter/_node/_worker.py): "" for a plain
# function, "sync" for one annotated Iterator[T] (Iterable, Generator), "async" for one
# annotated AsyncIterator[T] (AsyncIterable, AsyncGenerator).
StreamKind = Literal["", "sync", "async"]
_SYNC_STREAMS = (
    collections.abc.Iterator,
    collections.abc.Iterable,
    collections.abc.Generator,
)
_ASYNC_STREAMS = (
    collections.abc.AsyncIterator,
    collections.abc.AsyncIterable,
    collections.abc.AsyncGenerator,
)


def stream_of(annotation: Any) -> tuple[StreamKind, Any]:
    """(how a function with this return annotation streams, the type of one item).

    ``("", annotation)`` for anything that is not an iterator type. A bare ``Iterator``
    (no item type) streams items of ``Any``.
    """
    origin = typing.get_origin(annotation) or annotation
    if origin in _SYNC_STREAMS:
        kind: StreamKind = "sync"
    elif origin in _ASYNC_STREAMS:
        kind = "async"
    else:
        return "", annotation
    args = typing.get_args(annotation)
    return kind, args[0] if args else Any


_spec_encoder = msgspec.msgpack.Encoder()
_spec_decoder = msgspec.msgpack.Decoder(SignatureSpec)
_plain_encoder = msgspec.msgpack.Encoder()  # no enc_hook: msgspec's own types only

_NAMED = (RecordOf, TypedDictOf, NamedTupleOf)

# -- describing (the publisher) --------------------------------------------------------

_PRIM_INFOS: dict[type, PrimName] = {
    mi.AnyType: "any",
    mi.NoneType: "none",
    mi.BoolType: "bool",
    mi.IntType: "int",
    mi.FloatType: "float",
    mi.StrType: "str",
    mi.BytesType: "bytes",
    mi.ByteArrayType: "bytearray",
    mi.MemoryViewType: "memoryview",
    mi.DateTimeType: "datetime",
    mi.DateType: "date",
    mi.TimeType: "time",
    mi.TimeDeltaType: "timedelta",
    mi.UUIDType: "uuid",
    mi.DecimalType: "decimal",
    mi.ExtType: "ext",
    mi.RawType: "raw",
}

_COLLECTIONS: dict[type, Literal["list", "set", "frozenset", "vartuple"]] = {
    mi.ListType: "list",
    mi.SetType: "set",
    mi.FrozenSetType: "frozenset",
    mi.VarTupleType: "vartuple",
}


def _constraints(info: Any) -> Constraints | None:
    found = {
        name: getattr(info, name)
        for name in Constraints.__struct_fields__
        if getattr(info, name, None) is not None
    }
    return Constraints(**found) if found else None


def _default_of(value: Any) -> tuple[bytes | None, str]:
    try:
        text = repr(value)
    except Exception:
        text = "<default>"
    if len(text) > _MAX_REPR:
        text = text[: _MAX_REPR - 3] + "..."
    try:
        return _plain_encoder.encode(value), text
    except (TypeError, ValueError, OverflowError):
        return None, text


class _Describer:
    def __init__(self) -> None:
        self.types: list[Any] = []
        self.index: dict[Any, int] = {}

    def add(self, info: mi.Type) -> int:
        if isinstance(info, mi.Metadata):
            return self.add(info.type)
        if isinstance(info, mi.StructType | mi.DataclassType | mi.TypedDictType | mi.NamedTupleType):
            named = ("named", info.cls)
            found = self.index.get(named)
            if found is not None:
                return found
            position = len(self.types)
            self.types.append(None)  # reserved: fields may refer back to this class
            self.index[named] = position
            self.types[position] = self._named(info)
            return position
        node = self._node(info)
        key = _spec_encoder.encode(node)
        found = self.index.get(key)
        if found is None:
            found = len(self.types)
            self.types.append(node)
            self.index[key] = found
        return found

    def _node(self, info: mi.Type) -> Any:
        prim = _PRIM_INFOS.get(type(info))
        if prim is not None:
            return Prim(prim, _constraints(info))
        of = _COLLECTIONS.get(type(info))
        if of is not None:
            return Collection(of, self.add(info.item_type), _constraints(info))  # type: ignore[attr-defined]
        if isinstance(info, mi.TupleType):
            return TupleOf([self.add(t) for t in info.item_types])
        if isinstance(info, mi.DictType) or type(info).__name__ == "FrozenDictType":
            key_type = info.key_type  # type: ignore[attr-defined]
            value_type = info.value_type  # type: ignore[attr-defined]
            return DictOf(self.add(key_type), self.add(value_type), _constraints(info))
        if isinstance(info, mi.UnionType):
            return UnionOf([self.add(t) for t in info.types])
        if isinstance(info, mi.LiteralType):
            values = list(info.values)
            if not all(v is None or isinstance(v, bool | int | str) for v in values):
                raise NotScatterable(f"cannot describe Literal values {values!r}")
            return LiteralOf(values)
        if isinstance(info, mi.EnumType):
            return _enum_node(info.cls)
        if isinstance(info, mi.CustomType):
            if info.cls is object:
                return Prim("object")
            cls = info.cls
            return OpaqueOf(_module_of(cls), _qualname_of(cls))
        raise NotScatterable(f"cannot describe the annotation {info!r}")

    def _named(self, info: Any) -> Any:
        cls = info.cls
        base = typing.get_origin(cls) or cls
        fields = [self._field(f) for f in info.fields]
        module, qualname = _module_of(base), _qualname_of(base)
        if isinstance(info, mi.TypedDictType):
            return TypedDictOf(module, qualname, fields)
        if isinstance(info, mi.NamedTupleType):
            return NamedTupleOf(module, qualname, fields)
        if isinstance(info, mi.DataclassType):
            origin: Literal["dataclass", "attrs"] = (
                "attrs" if hasattr(base, "__attrs_attrs__") else "dataclass"
            )
            params = getattr(base, "__dataclass_params__", None)
            declared = getattr(base, "__dataclass_fields__", {}).values()
            return RecordOf(
                module,
                qualname,
                origin,
                fields,
                frozen=bool(getattr(params, "frozen", False)),
                kw_only=any(getattr(f, "kw_only", False) is True for f in declared),
            )
        config = base.__struct_config__
        positional = set(getattr(base, "__match_args__", ()))
        return RecordOf(
            module,
            qualname,
            "struct",
            fields,
            tag_field=info.tag_field,
            tag=info.tag,
            array_like=info.array_like,
            forbid_unknown_fields=info.forbid_unknown_fields,
            omit_defaults=config.omit_defaults,
            frozen=config.frozen,
            eq=config.eq,
            order=config.order,
            kw_only=any(f.name not in positional for f in info.fields),
        )

    def _field(self, info: mi.Field) -> FieldSpec:
        position = self.add(info.type)
        encode_name = info.encode_name if info.encode_name != info.name else ""
        if info.required:
            return FieldSpec(info.name, position, encode_name=encode_name)
        factory = False
        if info.default is not msgspec.NODEFAULT:
            default, text = _default_of(info.default)
        elif info.default_factory is not msgspec.NODEFAULT:
            factory = True
            try:
                default, text = _default_of(info.default_factory())
            except Exception:
                made = getattr(info.default_factory, "__qualname__", "factory")
                default, text = None, f"<{made}()>"
        else:  # an optional TypedDict key
            return FieldSpec(info.name, position, required=False, encode_name=encode_name)
        return FieldSpec(
            info.name,
            position,
            required=False,
            encode_name=encode_name,
            default=default,
            default_repr=text,
            factory=factory,
        )


def _module_of(cls: Any) -> str:
    return str(getattr(cls, "__module__", "") or "")


def _qualname_of(cls: Any) -> str:
    return str(getattr(cls, "__qualname__", None) or getattr(cls, "__name__", None) or repr(cls))


def _enum_node(cls: type[enum.Enum]) -> EnumOf:
    flavor: Literal["plain", "int", "str", "flag", "intflag"]
    if issubclass(cls, enum.IntFlag):
        flavor = "intflag"
    elif issubclass(cls, enum.Flag):
        flavor = "flag"
    elif issubclass(cls, int):
        flavor = "int"
    elif issubclass(cls, str):
        flavor = "str"
    else:
        flavor = "plain"
    members: list[tuple[str, int | str]] = []
    for member in cls:
        value = member.value
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise NotScatterable(f"cannot describe {cls.__qualname__}: its values must be int or str")
        members.append((member.name, value))
    return EnumOf(_module_of(cls), _qualname_of(cls), flavor, members)


def _annotation_or_any(annotation: Any) -> Any:
    return Any if annotation is inspect.Parameter.empty else annotation


def describe(sig: inspect.Signature) -> bytes:
    """The type description of ``sig``, for callers; NotScatterable if msgspec cannot view it."""
    annotations = [_annotation_or_any(p.annotation) for p in sig.parameters.values()]
    streams, returns_annotation = stream_of(_annotation_or_any(sig.return_annotation))
    annotations.append(returns_annotation)
    try:
        infos = mi.multi_type_info(annotations)
    except (TypeError, ValueError, NameError) as exc:
        raise NotScatterable(f"msgspec cannot describe an annotation: {exc}") from exc
    describer = _Describer()
    parameters = []
    for p, info in zip(sig.parameters.values(), infos, strict=False):
        position = describer.add(info)
        if p.default is inspect.Parameter.empty:
            parameters.append(ParameterSpec(p.name, p.kind.name, position))  # type: ignore[arg-type]
        else:
            default, text = _default_of(p.default)
            parameters.append(
                ParameterSpec(
                    p.name,
                    p.kind.name,  # type: ignore[arg-type]
                    position,
                    has_default=True,
                    default=default,
                    default_repr=text,
                )
            )
    returns = describer.add(infos[-1])
    return _spec_encoder.encode(
        SignatureSpec(FORMAT, describer.types, parameters, returns, streams)
    )


# -- rebuilding (the caller) -----------------------------------------------------------


class DescriptionError(ValueError):
    """A type description that does not rebuild into a signature."""


_PRIM_TYPES: dict[str, Any] = {
    "any": Any,
    "object": object,
    "none": None,
    "bool": bool,
    "int": int,
    "float": float,
    "str": str,
    "bytes": bytes,
    "bytearray": bytearray,
    "memoryview": memoryview,
    "ext": msgspec.msgpack.Ext,
    "raw": msgspec.Raw,
}


def _prim_types() -> None:
    import datetime
    import decimal
    import uuid

    _PRIM_TYPES.update(
        datetime=datetime.datetime,
        date=datetime.date,
        time=datetime.time,
        timedelta=datetime.timedelta,
        uuid=uuid.UUID,
        decimal=decimal.Decimal,
    )


_prim_types()

_ENUM_BASES: dict[str, type[enum.Enum]] = {
    "plain": enum.Enum,
    "int": enum.IntEnum,
    "str": enum.StrEnum,
    "flag": enum.Flag,
    "intflag": enum.IntFlag,
}

_IMMUTABLE = (
    type(None),
    bool,
    int,
    float,
    str,
    bytes,
    enum.Enum,
    *(_PRIM_TYPES[k] for k in ("datetime", "date", "time", "timedelta", "uuid", "decimal")),
)


def _identifier(name: str, what: str) -> str:
    if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
        raise DescriptionError(f"{what} {name!r} is not a Python identifier")
    return name


def _class_name(qualname: str) -> str:
    name = qualname.rsplit(".", 1)[-1]
    return name if name.isidentifier() else "Rebuilt"


def _with_constraints(base: Any, constraints: Constraints | None) -> Any:
    if constraints is None:
        return base
    values = {k: getattr(constraints, k) for k in constraints.__struct_fields__}
    found = {k: v for k, v in values.items() if v is not None}
    if not found:
        return base
    return Annotated[base, msgspec.Meta(**found)]


class _TypedDefault:
    """A default_factory: the shipped default, decoded against its field's rebuilt type."""

    __slots__ = ("data", "field_type")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.field_type: Any = Any

    def __call__(self) -> Any:
        return _decode_default(self.data, self.field_type)


def _decode_default(data: bytes, annotation: Any) -> Any:
    try:
        return msgspec.msgpack.decode(data, type=annotation)
    except Exception:  # a type that takes no plain data (an opaque stand-in), or bad data
        return msgspec.msgpack.decode(data)


def _namespace(obj: Any) -> Any:
    # Plain dict reads from here on: nothing that a module's __getattr__ could answer.
    if not isinstance(obj, types.ModuleType | type):
        return None
    found = vars(obj)
    return found if isinstance(found, dict | types.MappingProxyType) else None


def _local_class(module: str, qualname: str) -> type | None:
    """The class ``module.qualname`` if this process has already imported it, else None."""
    if "<" in qualname or not module:
        return None
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        namespace = _namespace(found)
        if namespace is None:
            return None
        found = namespace.get(part)
    if not isinstance(found, type):
        return None
    if found.__module__ != module or found.__qualname__ != qualname:
        return None
    return found


def _canonical(table: list[Any], position: int, seen: dict[int, int], open_: set[int]) -> Any:
    """A comparable form of the type at ``position``: named types by shape, cycles as refs."""
    if not 0 <= position < len(table):
        raise DescriptionError(f"type {position} is not in the description")
    node = table[position]
    if isinstance(node, _NAMED):
        if position in seen:
            return ("ref", seen[position])
        seen[position] = len(seen)
        fields = tuple(
            (
                f.name,
                f.encode_name,
                f.required,
                f.default,
                f.factory,
                _canonical(table, f.type, seen, open_),
            )
            for f in node.fields
        )
        plain = msgspec.structs.asdict(node)
        plain.pop("fields")
        return (type(node).__name__, tuple(sorted(plain.items(), key=str)), fields)
    if position in open_:
        raise DescriptionError("a type description refers to itself outside a class")
    open_.add(position)
    try:
        children: tuple[Any, ...] = ()
        if isinstance(node, Collection):
            children = (_canonical(table, node.item, seen, open_),)
        elif isinstance(node, TupleOf):
            children = tuple(_canonical(table, i, seen, open_) for i in node.items)
        elif isinstance(node, DictOf):
            children = (
                _canonical(table, node.key, seen, open_),
                _canonical(table, node.value, seen, open_),
            )
        elif isinstance(node, UnionOf):
            children = tuple(_canonical(table, i, seen, open_) for i in node.members)
        plain = {
            k: v
            for k, v in msgspec.to_builtins(node).items()
            if k not in ("item", "items", "key", "value", "members")
        }
        return (type(node).__name__, repr(sorted(plain.items())), children)
    finally:
        open_.discard(position)


class _Builder:
    def __init__(self, table: list[Any], *, local_classes: bool) -> None:
        self.table = table
        self.local_classes = local_classes
        self.built: dict[int, Any] = {}
        self.open: set[int] = set()
        self.finishers: list[Callable[[], None]] = []

    def build(self, position: int) -> Any:
        if position in self.built:
            return self.built[position]
        if not 0 <= position < len(self.table):
            raise DescriptionError(f"type {position} is not in the description")
        node = self.table[position]
        if isinstance(node, _NAMED):
            return self._named(position, node)
        if position in self.open:
            raise DescriptionError("a type description refers to itself outside a class")
        self.open.add(position)
        try:
            made = self._anonymous(position, node)
        finally:
            self.open.discard(position)
        self.built[position] = made
        return made

    def _anonymous(self, position: int, node: Any) -> Any:
        if isinstance(node, Prim):
            return _with_constraints(_PRIM_TYPES[node.name], node.constraints)
        if isinstance(node, Collection):
            item = self.build(node.item)
            made: Any
            if node.of == "list":
                made = list[item]  # type: ignore[valid-type]
            elif node.of == "set":
                made = set[item]  # type: ignore[valid-type]
            elif node.of == "frozenset":
                made = frozenset[item]  # type: ignore[valid-type]
            else:
                made = tuple[item, ...]  # type: ignore[valid-type]
            return _with_constraints(made, node.constraints)
        if isinstance(node, TupleOf):
            items = tuple(self.build(i) for i in node.items)
            return tuple[items] if items else tuple[()]  # type: ignore[valid-type]
        if isinstance(node, DictOf):
            made = dict[self.build(node.key), self.build(node.value)]  # type: ignore[misc]
            return _with_constraints(made, node.constraints)
        if isinstance(node, UnionOf):
            if not node.members:
                raise DescriptionError("an empty union")
            members = tuple(self.build(i) for i in node.members)
            return typing.Union[members]  # noqa: UP007 - built from a tuple
        if isinstance(node, LiteralOf):
            if not node.values:
                raise DescriptionError("an empty Literal")
            return Literal[tuple(node.values)]
        if isinstance(node, EnumOf):
            return self._local(position, node) or self._enum(node)
        if isinstance(node, OpaqueOf):
            return _opaque(node.module, node.qualname)
        raise DescriptionError(f"unknown type node {node!r}")

    def _local(self, position: int, node: Any) -> type | None:
        """The caller's own class, when it has one that describes exactly as ``node`` does."""
        if not self.local_classes:
            return None
        cls = _local_class(node.module, node.qualname)
        if cls is None:
            return None
        try:
            describer = _Describer()
            mine = describer.add(mi.type_info(cls))
            same = _canonical(describer.types, mine, {}, set()) == _canonical(
                self.table, position, {}, set()
            )
        except Exception:
            return None
        return cls if same else None

    def _enum(self, node: EnumOf) -> Any:
        members = []
        for name, value in node.members:
            _identifier(name, "enum member")
            if name.startswith("_"):
                raise DescriptionError(f"enum member {name!r} starts with an underscore")
            members.append((name, value))
        if not members:
            raise DescriptionError(f"enum {node.qualname} has no members")
        base: Any = _ENUM_BASES[node.flavor]
        made = base(_class_name(node.qualname), members, module=node.module)
        made.__qualname__ = node.qualname
        return made

    def _named(self, position: int, node: Any) -> Any:
        local = self._local(position, node)
        if local is not None:
            self.built[position] = local
            return local
        if isinstance(node, RecordOf):
            made, fill = self._record(node)
        elif isinstance(node, TypedDictOf):
            made, fill = self._typed_dict(node)
        else:
            made, fill = self._named_tuple(node)
        made.__module__ = node.module
        made.__qualname__ = node.qualname
        # Registered before its fields are built: a field may refer back to this class.
        self.built[position] = made
        annotations = {f.name: self.build(f.type) for f in node.fields}
        made.__annotations__ = annotations
        fill(annotations)
        return made

    def _record(self, node: RecordOf) -> tuple[Any, Callable[[dict[str, Any]], None]]:
        fields: list[tuple[str, Any, Any]] = []
        pending: list[tuple[str, _TypedDefault]] = []
        for f in node.fields:
            _identifier(f.name, "field")
            if f.name.startswith("__"):
                raise DescriptionError(f"field {f.name!r} starts with two underscores")
            encode_name = f.encode_name or f.name
            if f.required:
                spec = msgspec.field(name=encode_name)
            elif f.default is None:
                spec = msgspec.field(default=HiddenDefault(f.default_repr), name=encode_name)
            else:
                plain = self._plain_default(f)
                if plain is not _NO_PLAIN:
                    spec = msgspec.field(default=plain, name=encode_name)
                else:
                    factory = _TypedDefault(f.default)
                    pending.append((f.name, factory))
                    spec = msgspec.field(default_factory=factory, name=encode_name)
            fields.append((f.name, Any, spec))
        options: dict[str, Any] = {
            "module": node.module,
            "array_like": node.array_like,
            "forbid_unknown_fields": node.forbid_unknown_fields,
            "omit_defaults": node.omit_defaults,
            "frozen": node.frozen,
            "eq": node.eq,
            "order": node.order,
        }
        if node.tag is not None:
            options["tag"] = node.tag
            if node.tag_field is not None:
                options["tag_field"] = node.tag_field
        # Keyword-only as a whole when any field of the original was (or when required
        # fields follow defaulted ones, which only keyword-only fields can): all
        # keyword-only keeps the order, which array_like encodes by.
        name = _class_name(node.qualname)
        try:
            made = msgspec.defstruct(name, fields, kw_only=node.kw_only, **options)
        except TypeError:
            made = msgspec.defstruct(name, fields, kw_only=True, **options)
        origin = "msgspec Struct" if node.origin == "struct" else f"{node.origin} class"
        made.__doc__ = (
            f"Stand-in for the {origin} {node.module}.{node.qualname}, rebuilt from the "
            "type description its publisher shipped (same fields and wire shape)."
        )

        def fill(annotations: dict[str, Any]) -> None:
            for field_name, factory in pending:
                factory.field_type = annotations[field_name]

        return made, fill

    def _plain_default(self, f: FieldSpec) -> Any:
        """The default itself when its field's type has no children (so it is built
        already, or can be now) and the value is immutable, else _NO_PLAIN (a factory)."""
        if f.factory or f.default is None or not 0 <= f.type < len(self.table):
            return _NO_PLAIN
        if not isinstance(self.table[f.type], Prim | EnumOf | LiteralOf):
            return _NO_PLAIN
        value = _decode_default(f.default, self.build(f.type))
        return value if isinstance(value, _IMMUTABLE) else _NO_PLAIN

    def _typed_dict(self, node: TypedDictOf) -> tuple[Any, Callable[[dict[str, Any]], None]]:
        keys: dict[str, Any] = {}
        for f in node.fields:
            if not isinstance(f.name, str) or f.name in keys:
                raise DescriptionError(f"TypedDict key {f.name!r} given twice")
            keys[f.name] = Any if f.required else NotRequired[Any]
        made = _TYPED_DICT(_class_name(node.qualname), keys)
        return made, lambda annotations: None

    def _named_tuple(self, node: NamedTupleOf) -> tuple[Any, Callable[[dict[str, Any]], None]]:
        for f in node.fields:
            _identifier(f.name, "field")
        try:
            made = typing.NamedTuple(  # type: ignore[misc]
                _class_name(node.qualname), [(f.name, Any) for f in node.fields]
            )
        except (TypeError, ValueError) as exc:
            raise DescriptionError(f"cannot rebuild NamedTuple {node.qualname}: {exc}") from None
        defaulted = [f for f in node.fields if not f.required]
        if defaulted and node.fields[-len(defaulted) :] != defaulted:
            raise DescriptionError(f"NamedTuple {node.qualname}: defaults must come last")

        def fill(annotations: dict[str, Any]) -> None:
            def set_defaults() -> None:
                values = {
                    f.name: (
                        HiddenDefault(f.default_repr)
                        if f.default is None
                        else _decode_default(f.default, annotations[f.name])
                    )
                    for f in defaulted
                }
                made._field_defaults = values
                made.__new__.__defaults__ = tuple(values.values())

            self.finishers.append(set_defaults)

        return made, fill

    def finish(self) -> None:
        """Set what needs every type built first: NamedTuple defaults, decoded by type."""
        for step in self.finishers:
            step()
        # Decoding a default made msgspec cache its view of a class it met, maybe one
        # whose defaults were not set yet: let it look again.
        for made in self.built.values():
            if isinstance(made, type) and "__msgspec_cache__" in made.__dict__:
                delattr(made, "__msgspec_cache__")


_NO_PLAIN: Any = object()
_TYPED_DICT: Any = typing.TypedDict  # called with a name known only at run time

_KINDS: dict[str, inspect._ParameterKind] = {
    "POSITIONAL_ONLY": inspect.Parameter.POSITIONAL_ONLY,
    "POSITIONAL_OR_KEYWORD": inspect.Parameter.POSITIONAL_OR_KEYWORD,
    "VAR_POSITIONAL": inspect.Parameter.VAR_POSITIONAL,
    "KEYWORD_ONLY": inspect.Parameter.KEYWORD_ONLY,
    "VAR_KEYWORD": inspect.Parameter.VAR_KEYWORD,
}


def _opaque(module: str, qualname: str) -> type[OpaqueValue]:
    name = _class_name(qualname)
    made = type(
        name,
        (OpaqueValue,),
        {
            "__slots__": (),
            "__module__": module,
            "__qualname__": qualname,
            "__doc__": f"Stand-in for {module}.{qualname}: its values travel pickled, "
            "validated by the node.",
            "scatter_type": f"{module}.{qualname}",
        },
    )
    return made


def rebuild(data: bytes, *, local_classes: bool = True) -> inspect.Signature:
    """The signature a type description stands for; DescriptionError if it does not rebuild.

    With ``local_classes``, a class this process already has, and that describes the same,
    is used instead of a rebuilt one (see the module docstring).
    """
    try:
        spec = _spec_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DescriptionError(f"malformed type description: {exc}") from None
    if spec.format != FORMAT:
        raise DescriptionError(f"type description format {spec.format}, this Scatter reads {FORMAT}")
    builder = _Builder(spec.types, local_classes=local_classes)
    try:
        annotations = [builder.build(p.type) for p in spec.parameters]
        returns = builder.build(spec.returns)
        if spec.streams:
            iterator: Any = (
                collections.abc.Iterator if spec.streams == "sync" else collections.abc.AsyncIterator
            )
            returns = iterator[returns]
        builder.finish()
        parameters = []
        for p, annotation in zip(spec.parameters, annotations, strict=True):
            _identifier(p.name, "parameter")
            default: Any = inspect.Parameter.empty
            if p.has_default:
                default = (
                    HiddenDefault(p.default_repr)
                    if p.default is None
                    else _decode_default(p.default, annotation)
                )
            parameters.append(
                inspect.Parameter(p.name, _KINDS[p.kind], default=default, annotation=annotation)
            )
        return inspect.Signature(parameters, return_annotation=returns)
    except RecursionError:
        raise DescriptionError("type description nested too deeply") from None
    except DescriptionError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise DescriptionError(f"{type(exc).__name__}: {exc}") from None


__all__ = [
    "DescriptionError",
    "HiddenDefault",
    "OpaqueValue",
    "SignatureSpec",
    "describe",
    "rebuild",
]
