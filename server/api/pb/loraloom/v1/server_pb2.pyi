from server.api.pb.loraloom.v1 import adapters_pb2 as _adapters_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BaseModel(_message.Message):
    __slots__ = ("name", "source", "architecture", "fingerprint", "resolution", "family")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    architecture: str
    fingerprint: str
    resolution: int
    family: str
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., architecture: _Optional[str] = ..., fingerprint: _Optional[str] = ..., resolution: _Optional[int] = ..., family: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_upload_bytes", "max_queue", "max_steps", "max_images", "max_adapters", "max_size", "max_prompt_bytes", "max_rank", "max_abs_weight", "max_input_pixels")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_PIXELS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_upload_bytes: int
    max_queue: int
    max_steps: int
    max_images: int
    max_adapters: int
    max_size: int
    max_prompt_bytes: int
    max_rank: int
    max_abs_weight: float
    max_input_pixels: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_upload_bytes: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_images: _Optional[int] = ..., max_adapters: _Optional[int] = ..., max_size: _Optional[int] = ..., max_prompt_bytes: _Optional[int] = ..., max_rank: _Optional[int] = ..., max_abs_weight: _Optional[float] = ..., max_input_pixels: _Optional[int] = ...) -> None: ...

class QueueStats(_message.Message):
    __slots__ = ("queued", "running", "completed", "failed", "cancelled", "rejected", "deadline_exceeded", "invalid")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    INVALID_FIELD_NUMBER: _ClassVar[int]
    queued: int
    running: int
    completed: int
    failed: int
    cancelled: int
    rejected: int
    deadline_exceeded: int
    invalid: int
    def __init__(self, queued: _Optional[int] = ..., running: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ..., rejected: _Optional[int] = ..., deadline_exceeded: _Optional[int] = ..., invalid: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "base_model", "backend", "device", "dtype", "limits", "cache", "queue", "ready", "precision")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    version: str
    base_model: BaseModel
    backend: str
    device: str
    dtype: str
    limits: Limits
    cache: _adapters_pb2.CacheStats
    queue: QueueStats
    ready: bool
    precision: str
    def __init__(self, version: _Optional[str] = ..., base_model: _Optional[_Union[BaseModel, _Mapping]] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., cache: _Optional[_Union[_adapters_pb2.CacheStats, _Mapping]] = ..., queue: _Optional[_Union[QueueStats, _Mapping]] = ..., ready: _Optional[bool] = ..., precision: _Optional[str] = ...) -> None: ...
