from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat

class AdapterSpec(_message.Message):
    __slots__ = ("ref", "weight", "text_encoder_weight", "unet_weight")
    REF_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODER_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    UNET_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ref: str
    weight: float
    text_encoder_weight: float
    unet_weight: float
    def __init__(self, ref: _Optional[str] = ..., weight: _Optional[float] = ..., text_encoder_weight: _Optional[float] = ..., unet_weight: _Optional[float] = ...) -> None: ...

class BlendMerge(_message.Message):
    __slots__ = ("method", "density", "seed")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    method: str
    density: float
    seed: int
    def __init__(self, method: _Optional[str] = ..., density: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "adapters", "steps", "guidance_scale", "seed", "width", "height", "num_images", "format", "preview_every", "request_id", "sampler", "merge", "init_image", "strength", "mask_image", "clip_skip", "schedule", "eta")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    MASK_IMAGE_FIELD_NUMBER: _ClassVar[int]
    CLIP_SKIP_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterSpec]
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    num_images: int
    format: ImageFormat
    preview_every: int
    request_id: str
    sampler: str
    merge: BlendMerge
    init_image: bytes
    strength: float
    mask_image: bytes
    clip_skip: int
    schedule: str
    eta: float
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., adapters: _Optional[_Iterable[_Union[AdapterSpec, _Mapping]]] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_images: _Optional[int] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., preview_every: _Optional[int] = ..., request_id: _Optional[str] = ..., sampler: _Optional[str] = ..., merge: _Optional[_Union[BlendMerge, _Mapping]] = ..., init_image: _Optional[bytes] = ..., strength: _Optional[float] = ..., mask_image: _Optional[bytes] = ..., clip_skip: _Optional[int] = ..., schedule: _Optional[str] = ..., eta: _Optional[float] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "mime_type", "width", "height", "seed")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    width: int
    height: int
    seed: int
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "swap_ms", "inference_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    SWAP_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    swap_ms: float
    inference_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., swap_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class AppliedAdapter(_message.Message):
    __slots__ = ("name", "version", "sha256", "weight", "text_encoder_weight", "unet_weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODER_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    UNET_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    sha256: str
    weight: float
    text_encoder_weight: float
    unet_weight: float
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., weight: _Optional[float] = ..., text_encoder_weight: _Optional[float] = ..., unet_weight: _Optional[float] = ...) -> None: ...

class GenerationParameters(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed", "sampler", "num_images", "adapters", "merge", "strength", "init_image_sha256", "mask_image_sha256", "clip_skip", "schedule", "eta", "prompt_pieces")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    MASK_IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    CLIP_SKIP_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    PROMPT_PIECES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    sampler: str
    num_images: int
    adapters: _containers.RepeatedCompositeFieldContainer[AppliedAdapter]
    merge: BlendMerge
    strength: float
    init_image_sha256: str
    mask_image_sha256: str
    clip_skip: int
    schedule: str
    eta: float
    prompt_pieces: _containers.RepeatedCompositeFieldContainer[PromptPiece]
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., sampler: _Optional[str] = ..., num_images: _Optional[int] = ..., adapters: _Optional[_Iterable[_Union[AppliedAdapter, _Mapping]]] = ..., merge: _Optional[_Union[BlendMerge, _Mapping]] = ..., strength: _Optional[float] = ..., init_image_sha256: _Optional[str] = ..., mask_image_sha256: _Optional[str] = ..., clip_skip: _Optional[int] = ..., schedule: _Optional[str] = ..., eta: _Optional[float] = ..., prompt_pieces: _Optional[_Iterable[_Union[PromptPiece, _Mapping]]] = ...) -> None: ...

class PromptPiece(_message.Message):
    __slots__ = ("text", "weight")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    text: str
    weight: float
    def __init__(self, text: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("images", "timing", "blend_signature", "parameters", "request_id")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    BLEND_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    timing: Timing
    blend_signature: str
    parameters: GenerationParameters
    request_id: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., blend_signature: _Optional[str] = ..., parameters: _Optional[_Union[GenerationParameters, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class QueuedEvent(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class ProgressEvent(_message.Message):
    __slots__ = ("step", "total_steps", "preview")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    preview: Image
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., preview: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class ImageChunk(_message.Message):
    __slots__ = ("index", "offset", "data", "total_size", "last", "mime_type", "width", "height", "seed")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    index: int
    offset: int
    data: bytes
    total_size: int
    last: bool
    mime_type: str
    width: int
    height: int
    seed: int
    def __init__(self, index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., last: _Optional[bool] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class DoneEvent(_message.Message):
    __slots__ = ("timing", "blend_signature", "parameters", "request_id")
    TIMING_FIELD_NUMBER: _ClassVar[int]
    BLEND_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    timing: Timing
    blend_signature: str
    parameters: GenerationParameters
    request_id: str
    def __init__(self, timing: _Optional[_Union[Timing, _Mapping]] = ..., blend_signature: _Optional[str] = ..., parameters: _Optional[_Union[GenerationParameters, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("queued", "progress", "image_chunk", "done")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    queued: QueuedEvent
    progress: ProgressEvent
    image_chunk: ImageChunk
    done: DoneEvent
    def __init__(self, queued: _Optional[_Union[QueuedEvent, _Mapping]] = ..., progress: _Optional[_Union[ProgressEvent, _Mapping]] = ..., image_chunk: _Optional[_Union[ImageChunk, _Mapping]] = ..., done: _Optional[_Union[DoneEvent, _Mapping]] = ...) -> None: ...
