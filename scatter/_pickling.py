"""cloudpickle, taught to ship msgspec Structs by value.

cloudpickle rebuilds a class by value in two steps: an empty skeleton class, then its
attributes. A ``msgspec.Struct`` fixes its fields when the class is created, from the
annotations, so the skeleton has no fields and every instance encodes as ``{}``
(found by ``test_every_supported_type_round_trips_through_a_node``). Such classes are
rebuilt here with ``msgspec.defstruct`` instead, from their resolved fields, config and
methods. Within one process a Struct keeps its identity: unpickling returns the class
that was pickled, as cloudpickle does for its own dynamic classes.
"""

from __future__ import annotations

import io
import types
import uuid
import weakref
from typing import Any

import cloudpickle
import msgspec
from cloudpickle import cloudpickle as _cloudpickle_internals

# {tracker id: Struct class}: the classes this process pickled or rebuilt.
_STRUCTS: weakref.WeakValueDictionary[str, type] = weakref.WeakValueDictionary()
_STRUCT_IDS: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()

_CONFIG_FIELDS = (
    "frozen",
    "eq",
    "order",
    "array_like",
    "gc",
    "omit_defaults",
    "forbid_unknown_fields",
    "repr_omit_defaults",
)
_SKIP = {
    "__module__",
    "__qualname__",
    "__annotations__",
    "__slots__",
    "__dict__",
    "__weakref__",
    "__match_args__",
    "__doc__",
}


def _by_value(cls: type) -> bool:
    return not _cloudpickle_internals._should_pickle_by_reference(cls)


def _struct_reduce(cls: type[msgspec.Struct]) -> tuple[Any, ...]:
    tracker = _STRUCT_IDS.get(cls)
    if tracker is None:
        tracker = uuid.uuid4().hex
        _STRUCT_IDS[cls] = tracker
        _STRUCTS[tracker] = cls
    # (name, type, "factory" | "default" | "", default or factory, encoded name):
    # msgspec.field objects themselves do not pickle.
    fields: list[tuple[str, Any, str, Any, str]] = []
    for info in msgspec.structs.fields(cls):
        if info.default_factory is not msgspec.NODEFAULT:
            fields.append((info.name, info.type, "factory", info.default_factory, info.encode_name))
        elif info.default is not msgspec.NODEFAULT:
            fields.append((info.name, info.type, "default", info.default, info.encode_name))
        else:
            fields.append((info.name, info.type, "", None, info.encode_name))
    config = cls.__struct_config__
    options = {name: getattr(config, name) for name in _CONFIG_FIELDS}
    if config.tag is not None:
        options["tag"] = config.tag
        options["tag_field"] = config.tag_field
    names = {f[0] for f in fields}
    namespace = {
        key: value
        for key, value in cls.__dict__.items()
        if key not in _SKIP and key not in names and not key.startswith("__struct_")
        and not isinstance(value, types.MemberDescriptorType)
    }
    namespace["__doc__"] = cls.__doc__
    return (
        _rebuild_struct,
        (tracker, cls.__name__, cls.__qualname__, cls.__module__, fields, options, namespace),
    )


def _rebuild_struct(
    tracker: str,
    name: str,
    qualname: str,
    module: str,
    shipped_fields: list[tuple[str, Any, str, Any, str]],
    options: dict[str, Any],
    namespace: dict[str, Any],
) -> type:
    existing = _STRUCTS.get(tracker)
    if existing is not None:
        return existing
    fields: list[tuple[str, Any, Any]] = []
    for field_name, field_type, kind, value, encode_name in shipped_fields:
        if kind == "factory":
            spec: Any = msgspec.field(default_factory=value, name=encode_name)
        elif kind == "default":
            spec = msgspec.field(default=value, name=encode_name)
        else:
            spec = msgspec.field(name=encode_name)
        fields.append((field_name, field_type, spec))
    try:
        cls = msgspec.defstruct(name, fields, module=module, namespace=namespace, **options)
    except TypeError:  # required fields after defaulted ones: the original was kw_only
        cls = msgspec.defstruct(
            name, fields, module=module, namespace=namespace, kw_only=True, **options
        )
    cls.__qualname__ = qualname
    _STRUCTS[tracker] = cls
    _STRUCT_IDS[cls] = tracker
    return cls


class _Pickler(cloudpickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if (
            isinstance(obj, type)
            and issubclass(obj, msgspec.Struct)
            and obj is not msgspec.Struct
            and _by_value(obj)
        ):
            return _struct_reduce(obj)
        if isinstance(obj, type) and "__msgspec_cache__" in obj.__dict__ and _by_value(obj):
            # msgspec caches its view of a dataclass on the class; the cache does not
            # pickle, and the rebuilt class makes its own.
            reduced = _cloudpickle_internals._dynamic_class_reduce(obj)
            state, slotstate = reduced[2]
            state = {k: v for k, v in state.items() if k != "__msgspec_cache__"}
            return (*reduced[:2], (state, slotstate), *reduced[3:])
        return super().reducer_override(obj)


def dumps(obj: Any) -> bytes:
    """cloudpickle.dumps, with Struct classes shipped by value (see the module docstring)."""
    with io.BytesIO() as buffer:
        _Pickler(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
        return buffer.getvalue()


loads = cloudpickle.loads


def stable_pickle_identity(data: bytes) -> bytes:
    """``data`` with each class tracker id replaced by the class's qualified name.

    Classes pickled by value carry a random id per process (cloudpickle's, and ours for
    Structs) so that one process maps them back to one class. Hashed as they are, the
    same code scattered from two runs of a notebook would never look identical, and
    re-scattering an unchanged body would not be the no-op it must be.
    See test_rescattering_same_code_from_another_process_changes_nothing.
    """
    trackers = list(_cloudpickle_internals._DYNAMIC_CLASS_TRACKER_BY_CLASS.items())
    trackers += list(_STRUCT_IDS.items())
    for cls, tracker in trackers:
        token = tracker.encode()
        if token in data:
            data = data.replace(token, f"{cls.__module__}.{cls.__qualname__}".encode())
    return data
