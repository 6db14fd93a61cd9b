"""The versioned trace schema: one episode = a header, its steps and its score.

Bump ``SCHEMA_VERSION`` when a field changes meaning; readers keep loading older
versions (``tests/traces/fixtures/v1_traces.jsonl`` is a frozen version-1 file that must
always load). Adding a field with a default is not a change of meaning: version-1 files
simply lack it. A file from a *newer* schema is refused with a message saying so.
Images are never inlined: steps hold content hashes into the image store.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The four question stages, in order (the task sources stage their questions with these names).
STAGES = ("recognition", "measurement", "visual_reasoning", "medical_reasoning")
SCHEMA_VERSION = 1
ERR_NEWER_SCHEMA = (
    "trace schema version {found} is newer than this medgym understands (up to {known}); "
    "upgrade medgym to read this file."
)


class TraceModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolCallRecord(TraceModel):
    name: str = Field(description="Tool name as the model wrote it.")
    arguments: dict[str, Any] = Field(default_factory=dict, description="Arguments as the model wrote them.")
    tool_version: str | None = Field(default=None, description="Version of the tool that ran (None: unknown tool).")
    text: str = Field(description="Text returned to the model.")
    data: dict[str, Any] = Field(default_factory=dict, description="Structured result (boxes, numbers, mask ids).")
    images: list[str] = Field(default_factory=list, description="Content hashes of returned images.")
    error: bool = Field(default=False, description="True when the call returned an error result.")
    seconds: float = Field(default=0.0, description="Wall time of the call.")


class TraceStep(TraceModel):
    index: int
    model_text: str = Field(description="The model's raw turn.")
    calls: list[ToolCallRecord] = Field(default_factory=list)
    answer: str | None = None
    box: list[float] | None = None
    format_error: str | None = None
    reward: float = 0.0


class TraceHeader(TraceModel):
    schema_version: int = SCHEMA_VERSION
    episode_id: str
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    env_id: str | None = None
    source: str
    seed: int | None = None
    case_id: str
    stage: str
    template: str
    question: str
    answer: str
    answer_type: Literal["mc", "yesno", "numeric", "box", "open"]
    choices: list[str] = Field(default_factory=list)
    answer_box: list[float] | None = None
    image: str | None = Field(default=None, description="Content hash of the picture shown with the question.")
    prior_image: str | None = None
    model_id: str = "unknown"
    prompt_hash: str | None = None
    tool_versions: dict[str, str] = Field(default_factory=dict)
    # What replay needs to rebuild the case and the tool context (absent in early version-1 files).
    source_spec: str | None = Field(
        default=None, description="The spec the source was made from (``make_source(spec, **source_config)``)."
    )
    source_config: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the source.")
    study_hash: str | None = Field(default=None, description="``Study.content_hash()`` of the current study.")
    segmenter: str | None = Field(default=None, description="Segment backend that ran (medsam, sam, threshold).")
    sam_checkpoint: str | None = Field(default=None, description="SAM checkpoint path when segmenter is 'sam'.")
    tool_mode: str | None = Field(
        default=None,
        description="'predicted' (no tool reads ground truth) or 'oracle' (tools read it: an upper bound); "
        "None in files written before tool modes existed, whose tools behaved as 'oracle'.",
    )
    # What scoring needs to judge numeric answers against tool evidence.
    unit: str | None = Field(default=None, description="Unit of a numeric answer ('' none; None: not recorded).")
    tolerance: float | None = Field(default=None, description="Relative tolerance of the numeric answer.")
    abs_tolerance: float | None = Field(default=None, description="Absolute tolerance floor of the numeric answer.")
    medgym_version: str | None = None

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > SCHEMA_VERSION:
            raise ValueError(ERR_NEWER_SCHEMA.format(found=v, known=SCHEMA_VERSION))
        return v


# Header fields added after version-1 files were first written (see TraceEpisode.compute_hash).
ADDED_HEADER_FIELDS = (
    "source_spec",
    "source_config",
    "study_hash",
    "segmenter",
    "sam_checkpoint",
    "tool_mode",
    "unit",
    "tolerance",
    "abs_tolerance",
    "medgym_version",
)


class TraceEpisode(TraceModel):
    header: TraceHeader
    steps: list[TraceStep] = Field(default_factory=list)
    final_answer: str | None = None
    final_box: list[float] | None = None
    score: dict[str, float | None] = Field(default_factory=dict, description="Reward parts at the answer.")
    reward: float = 0.0
    truncated: bool = False
    content_hash: str | None = Field(default=None, description="sha256 of the episode without this field.")

    def compute_hash(self) -> str:
        """sha256 of the episode's JSON without ``content_hash``.

        Fields added to the schema after files were written (``ADDED_HEADER_FIELDS``) are
        left out while they hold their default, so an older file, which lacks them and
        loads with the defaults, still hashes to what its writer sealed.
        """
        body = self.model_dump(mode="json", exclude={"content_hash"})
        header = body["header"]
        for name in ADDED_HEADER_FIELDS:
            if name in header and header[name] == TraceHeader.model_fields[name].get_default(call_default_factory=True):
                del header[name]
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def sealed(self) -> TraceEpisode:
        return self.model_copy(update={"content_hash": self.compute_hash()})
