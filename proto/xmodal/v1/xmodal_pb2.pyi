from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    MODALITY_IMAGE: _ClassVar[Modality]
    MODALITY_TEXT: _ClassVar[Modality]
MODALITY_UNSPECIFIED: Modality
MODALITY_IMAGE: Modality
MODALITY_TEXT: Modality

class Query(_message.Message):
    __slots__ = ("text", "image", "item_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    item_id: str
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ..., item_id: _Optional[str] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "target", "k", "filter")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    query: Query
    target: Modality
    k: int
    filter: Filter
    def __init__(self, query: _Optional[_Union[Query, _Mapping]] = ..., target: _Optional[_Union[Modality, str]] = ..., k: _Optional[int] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("all_of",)
    ALL_OF_FIELD_NUMBER: _ClassVar[int]
    all_of: _containers.RepeatedCompositeFieldContainer[Condition]
    def __init__(self, all_of: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("field", "any_of", "min", "max", "min_text", "max_text")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MIN_TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_FIELD_NUMBER: _ClassVar[int]
    field: str
    any_of: _containers.RepeatedScalarFieldContainer[str]
    min: float
    max: float
    min_text: str
    max_text: str
    def __init__(self, field: _Optional[str] = ..., any_of: _Optional[_Iterable[str]] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., min_text: _Optional[str] = ..., max_text: _Optional[str] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("item_id", "score", "modality", "text", "source", "metadata_json", "rank")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    modality: Modality
    text: str
    source: str
    metadata_json: str
    rank: int
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., modality: _Optional[_Union[Modality, str]] = ..., text: _Optional[str] = ..., source: _Optional[str] = ..., metadata_json: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "snapshot_id", "timing")
    HITS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    snapshot_id: str
    timing: Timing
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., snapshot_id: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("encode_ms", "head_ms", "search_ms", "total_ms")
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    HEAD_MS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    encode_ms: float
    head_ms: float
    search_ms: float
    total_ms: float
    def __init__(self, encode_ms: _Optional[float] = ..., head_ms: _Optional[float] = ..., search_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class GetItemsRequest(_message.Message):
    __slots__ = ("item_ids", "metadata_only")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    METADATA_ONLY_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    metadata_only: bool
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., metadata_only: _Optional[bool] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("item_id", "modality", "text", "image", "source", "metadata_json", "content_hash")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    modality: Modality
    text: str
    image: bytes
    source: str
    metadata_json: str
    content_hash: str
    def __init__(self, item_id: _Optional[str] = ..., modality: _Optional[_Union[Modality, str]] = ..., text: _Optional[str] = ..., image: _Optional[bytes] = ..., source: _Optional[str] = ..., metadata_json: _Optional[str] = ..., content_hash: _Optional[str] = ...) -> None: ...

class GetItemsResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModalityCount(_message.Message):
    __slots__ = ("modality", "catalog_items", "indexed")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    CATALOG_ITEMS_FIELD_NUMBER: _ClassVar[int]
    INDEXED_FIELD_NUMBER: _ClassVar[int]
    modality: Modality
    catalog_items: int
    indexed: int
    def __init__(self, modality: _Optional[_Union[Modality, str]] = ..., catalog_items: _Optional[int] = ..., indexed: _Optional[int] = ...) -> None: ...

class SnapshotInfo(_message.Message):
    __slots__ = ("snapshot_id", "created_at", "encoder", "head_kind", "head_hash", "faiss_factory", "dim", "parent_id", "metrics_json")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    HEAD_KIND_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    FAISS_FACTORY_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    created_at: str
    encoder: str
    head_kind: str
    head_hash: str
    faiss_factory: str
    dim: int
    parent_id: str
    metrics_json: str
    def __init__(self, snapshot_id: _Optional[str] = ..., created_at: _Optional[str] = ..., encoder: _Optional[str] = ..., head_kind: _Optional[str] = ..., head_hash: _Optional[str] = ..., faiss_factory: _Optional[str] = ..., dim: _Optional[int] = ..., parent_id: _Optional[str] = ..., metrics_json: _Optional[str] = ...) -> None: ...

class FeedbackCounts(_message.Message):
    __slots__ = ("total", "since_last_refit")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SINCE_LAST_REFIT_FIELD_NUMBER: _ClassVar[int]
    total: int
    since_last_refit: int
    def __init__(self, total: _Optional[int] = ..., since_last_refit: _Optional[int] = ...) -> None: ...

class RefitRun(_message.Message):
    __slots__ = ("run_id", "mode", "state", "started_at", "duration_s", "before_json", "after_json", "snapshot_id", "message", "progress", "feedback_events")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    BEFORE_JSON_FIELD_NUMBER: _ClassVar[int]
    AFTER_JSON_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_EVENTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    mode: str
    state: str
    started_at: str
    duration_s: float
    before_json: str
    after_json: str
    snapshot_id: str
    message: str
    progress: str
    feedback_events: int
    def __init__(self, run_id: _Optional[str] = ..., mode: _Optional[str] = ..., state: _Optional[str] = ..., started_at: _Optional[str] = ..., duration_s: _Optional[float] = ..., before_json: _Optional[str] = ..., after_json: _Optional[str] = ..., snapshot_id: _Optional[str] = ..., message: _Optional[str] = ..., progress: _Optional[str] = ..., feedback_events: _Optional[int] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("serving", "snapshot", "counts", "version", "uptime_s", "max_k", "data_dir", "feedback", "refits", "live_corpus", "filter_fields", "read_only", "primary")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    DATA_DIR_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    REFITS_FIELD_NUMBER: _ClassVar[int]
    LIVE_CORPUS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELDS_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    snapshot: SnapshotInfo
    counts: _containers.RepeatedCompositeFieldContainer[ModalityCount]
    version: str
    uptime_s: float
    max_k: int
    data_dir: str
    feedback: FeedbackCounts
    refits: _containers.RepeatedCompositeFieldContainer[RefitRun]
    live_corpus: LiveCorpus
    filter_fields: _containers.RepeatedCompositeFieldContainer[FilterField]
    read_only: bool
    primary: str
    def __init__(self, serving: _Optional[bool] = ..., snapshot: _Optional[_Union[SnapshotInfo, _Mapping]] = ..., counts: _Optional[_Iterable[_Union[ModalityCount, _Mapping]]] = ..., version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., max_k: _Optional[int] = ..., data_dir: _Optional[str] = ..., feedback: _Optional[_Union[FeedbackCounts, _Mapping]] = ..., refits: _Optional[_Iterable[_Union[RefitRun, _Mapping]]] = ..., live_corpus: _Optional[_Union[LiveCorpus, _Mapping]] = ..., filter_fields: _Optional[_Iterable[_Union[FilterField, _Mapping]]] = ..., read_only: _Optional[bool] = ..., primary: _Optional[str] = ...) -> None: ...

class FilterField(_message.Message):
    __slots__ = ("name", "kind", "declared")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DECLARED_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    declared: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., declared: _Optional[bool] = ...) -> None: ...

class LiveCorpus(_message.Message):
    __slots__ = ("delta_items", "hidden_items", "pending_erasure", "last_compaction_snapshot_id", "last_compaction_s")
    DELTA_ITEMS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    PENDING_ERASURE_FIELD_NUMBER: _ClassVar[int]
    LAST_COMPACTION_SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_COMPACTION_S_FIELD_NUMBER: _ClassVar[int]
    delta_items: int
    hidden_items: int
    pending_erasure: int
    last_compaction_snapshot_id: str
    last_compaction_s: float
    def __init__(self, delta_items: _Optional[int] = ..., hidden_items: _Optional[int] = ..., pending_erasure: _Optional[int] = ..., last_compaction_snapshot_id: _Optional[str] = ..., last_compaction_s: _Optional[float] = ...) -> None: ...

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("query", "relevant_ids", "irrelevant_ids", "weight", "source")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    RELEVANT_IDS_FIELD_NUMBER: _ClassVar[int]
    IRRELEVANT_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    query: Query
    relevant_ids: _containers.RepeatedScalarFieldContainer[str]
    irrelevant_ids: _containers.RepeatedScalarFieldContainer[str]
    weight: float
    source: str
    def __init__(self, query: _Optional[_Union[Query, _Mapping]] = ..., relevant_ids: _Optional[_Iterable[str]] = ..., irrelevant_ids: _Optional[_Iterable[str]] = ..., weight: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class SubmitFeedbackResponse(_message.Message):
    __slots__ = ("feedback_id",)
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    def __init__(self, feedback_id: _Optional[str] = ...) -> None: ...

class RefitRequest(_message.Message):
    __slots__ = ("mode",)
    MODE_FIELD_NUMBER: _ClassVar[int]
    mode: str
    def __init__(self, mode: _Optional[str] = ...) -> None: ...

class RefitResponse(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots", "live_id")
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    LIVE_ID_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[SnapshotInfo]
    live_id: str
    def __init__(self, snapshots: _Optional[_Iterable[_Union[SnapshotInfo, _Mapping]]] = ..., live_id: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: SnapshotInfo
    def __init__(self, snapshot: _Optional[_Union[SnapshotInfo, _Mapping]] = ...) -> None: ...

class CompactRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CompactResponse(_message.Message):
    __slots__ = ("snapshot_id", "folded_items", "erased_items", "rewritten_snapshots", "seconds")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    FOLDED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    ERASED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    REWRITTEN_SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    folded_items: int
    erased_items: int
    rewritten_snapshots: int
    seconds: float
    def __init__(self, snapshot_id: _Optional[str] = ..., folded_items: _Optional[int] = ..., erased_items: _Optional[int] = ..., rewritten_snapshots: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class NewItem(_message.Message):
    __slots__ = ("item_id", "text", "image", "metadata_json", "pair_id", "source")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    PAIR_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    text: str
    image: bytes
    metadata_json: str
    pair_id: str
    source: str
    def __init__(self, item_id: _Optional[str] = ..., text: _Optional[str] = ..., image: _Optional[bytes] = ..., metadata_json: _Optional[str] = ..., pair_id: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[NewItem]
    def __init__(self, items: _Optional[_Iterable[_Union[NewItem, _Mapping]]] = ...) -> None: ...

class UpsertItemsResponse(_message.Message):
    __slots__ = ("added", "changed", "unchanged", "pairs_added", "item_ids")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    PAIRS_ADDED_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    added: int
    changed: int
    unchanged: int
    pairs_added: int
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, added: _Optional[int] = ..., changed: _Optional[int] = ..., unchanged: _Optional[int] = ..., pairs_added: _Optional[int] = ..., item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteItemsRequest(_message.Message):
    __slots__ = ("item_ids", "purge")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    PURGE_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    purge: bool
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., purge: _Optional[bool] = ...) -> None: ...

class DeleteItemsResponse(_message.Message):
    __slots__ = ("deleted_ids", "unknown_ids")
    DELETED_IDS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_IDS_FIELD_NUMBER: _ClassVar[int]
    deleted_ids: _containers.RepeatedScalarFieldContainer[str]
    unknown_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted_ids: _Optional[_Iterable[str]] = ..., unknown_ids: _Optional[_Iterable[str]] = ...) -> None: ...
