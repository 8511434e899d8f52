"""The message classes of MindSpore's strategy files (`node_strategy.proto`), built at import time.

The descriptor is written here in Python (`node_strategy.proto` beside this module is the same schema, checked in
for reference): MindSpore parses and writes these files with the protobuf runtime, so using the runtime with the
same schema makes required-field checks, unknown fields and repeated-field merging behave exactly as there, and
the writer's bytes match those of MindSpore's own classes. No protoc, no generated code to version-pin.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_SCHEMA: dict[str, list[tuple[str, int, int, Any]]] = {  # message -> (field, number, label, type or message)
    "ParallelStrategy": [("dim", 1, _F.LABEL_REPEATED, _F.TYPE_UINT32)],
    "ParallelStrategys": [("stage", 1, _F.LABEL_REQUIRED, _F.TYPE_UINT32),
                          ("parallel_strategy", 2, _F.LABEL_REPEATED, "ParallelStrategy")],
    "ParallelStrategyItem": [("node_name", 1, _F.LABEL_REQUIRED, _F.TYPE_STRING),
                             ("parallel_strategys", 2, _F.LABEL_REQUIRED, "ParallelStrategys")],
    "DevMatrix": [("dim", 1, _F.LABEL_REPEATED, _F.TYPE_UINT32)],
    "TensorMap": [("dim", 1, _F.LABEL_REPEATED, _F.TYPE_INT32)],
    "ParamSplitShape": [("dim", 1, _F.LABEL_REPEATED, _F.TYPE_INT64)],
    "IndicesOffset": [("dim", 1, _F.LABEL_REPEATED, _F.TYPE_INT64)],
    "ParallelLayouts": [("dev_matrix", 1, _F.LABEL_REPEATED, "DevMatrix"),
                        ("tensor_map", 2, _F.LABEL_REPEATED, "TensorMap"),
                        ("param_split_shape", 3, _F.LABEL_REPEATED, "ParamSplitShape"),
                        ("indices_offset", 4, _F.LABEL_REPEATED, "IndicesOffset"),
                        ("field", 5, _F.LABEL_REQUIRED, _F.TYPE_INT32),
                        ("opt_weight_shard_step", 6, _F.LABEL_REQUIRED, _F.TYPE_INT32),
                        ("opt_weight_shard_size", 7, _F.LABEL_REQUIRED, _F.TYPE_INT32)],
    "ParallelLayoutItem": [("param_name", 1, _F.LABEL_REQUIRED, _F.TYPE_STRING),
                           ("parallel_layouts", 2, _F.LABEL_REQUIRED, "ParallelLayouts")],
    "ParallelStrategyMap": [("current_stage", 1, _F.LABEL_REQUIRED, _F.TYPE_UINT32),
                            ("parallel_strategy_item", 2, _F.LABEL_REPEATED, "ParallelStrategyItem"),
                            ("parallel_layout_item", 3, _F.LABEL_REPEATED, "ParallelLayoutItem")],
}  # fmt: skip


def _message_classes() -> dict[str, type]:
    proto = descriptor_pb2.FileDescriptorProto(name="jaxreshard/node_strategy.proto", package="mindspore.straspb")
    proto.syntax = "proto2"
    for name, fields in _SCHEMA.items():
        message = proto.message_type.add(name=name)
        for fname, number, label, kind in fields:
            f = message.field.add(name=fname, number=number, label=label)
            if isinstance(kind, str):
                f.type, f.type_name = _F.TYPE_MESSAGE, f".mindspore.straspb.{kind}"
            else:
                f.type = kind
    pool = descriptor_pool.DescriptorPool()  # private: MindSpore's own classes may be loaded beside ours
    pool.Add(proto)
    get_class = getattr(message_factory, "GetMessageClass", None)
    if get_class is None:  # protobuf < 4.22: MessageFactory.GetPrototype, which newer stubs no longer declare
        get_class = message_factory.MessageFactory(pool).GetPrototype  # pyright: ignore[reportAttributeAccessIssue]
    return {n: get_class(pool.FindMessageTypeByName(f"mindspore.straspb.{n}")) for n in _SCHEMA}


_MSG = _message_classes()
ParallelStrategyMap = _MSG["ParallelStrategyMap"]
