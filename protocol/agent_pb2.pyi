from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AddFeedbackRequest(_message.Message):
    __slots__ = ("prompt", "chosen", "rejected")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chosen: str
    rejected: str
    def __init__(self, prompt: _Optional[str] = ..., chosen: _Optional[str] = ..., rejected: _Optional[str] = ...) -> None: ...

class AddFeedbackReply(_message.Message):
    __slots__ = ("id", "total")
    ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    id: int
    total: int
    def __init__(self, id: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("prompt", "candidates")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    candidates: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., candidates: _Optional[_Iterable[str]] = ...) -> None: ...

class RankedCandidate(_message.Message):
    __slots__ = ("candidate", "personal_score", "unsafe_categories", "allowed", "reason", "position")
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    UNSAFE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    candidate: str
    personal_score: float
    unsafe_categories: _containers.RepeatedScalarFieldContainer[str]
    allowed: bool
    reason: str
    position: int
    def __init__(self, candidate: _Optional[str] = ..., personal_score: _Optional[float] = ..., unsafe_categories: _Optional[_Iterable[str]] = ..., allowed: _Optional[bool] = ..., reason: _Optional[str] = ..., position: _Optional[int] = ...) -> None: ...

class RankReply(_message.Message):
    __slots__ = ("ranked", "policy_version")
    RANKED_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ranked: _containers.RepeatedCompositeFieldContainer[RankedCandidate]
    policy_version: int
    def __init__(self, ranked: _Optional[_Iterable[_Union[RankedCandidate, _Mapping]]] = ..., policy_version: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("pairs", "adapter_version", "policy_version", "epsilon_sample", "delta", "server", "node_public_key")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    NODE_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    pairs: int
    adapter_version: str
    policy_version: int
    epsilon_sample: float
    delta: float
    server: str
    node_public_key: str
    def __init__(self, pairs: _Optional[int] = ..., adapter_version: _Optional[str] = ..., policy_version: _Optional[int] = ..., epsilon_sample: _Optional[float] = ..., delta: _Optional[float] = ..., server: _Optional[str] = ..., node_public_key: _Optional[str] = ...) -> None: ...

class ForgetRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForgetReply(_message.Message):
    __slots__ = ("pairs_deleted", "adapter_deleted", "accountant_deleted")
    PAIRS_DELETED_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_DELETED_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_DELETED_FIELD_NUMBER: _ClassVar[int]
    pairs_deleted: int
    adapter_deleted: bool
    accountant_deleted: bool
    def __init__(self, pairs_deleted: _Optional[int] = ..., adapter_deleted: _Optional[bool] = ..., accountant_deleted: _Optional[bool] = ...) -> None: ...
