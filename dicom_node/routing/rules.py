"""The routing rule: conditions, actions, destinations and policies, validated once constructed.

The configuration contract (``[[rules]]`` in config.toml; the API and CLI take the same fields)::

    [[rules]]                         # evaluated in order; each match's actions run
    name = "chest-ct"
    match = { Modality = "CT", BodyPartExamined = "/CHEST|LUNG/", calling_ae = "CT_*" }
    actions = ["analyse"]             # any of "analyse", "forward", "discard"
    destinations = ["sender"]         # destination names, or "sender"

Extensions (all optional): ``outputs = { pacs_a = ["sr", "seg"], archive = ["originals"] }`` per
destination (or ``sender``) overrides the destination's own outputs; ``level = "study"`` decides
when the whole study is complete; ``quiet_seconds`` overrides ``[completion] quiet_seconds``;
``priority = "urgent"`` puts the rule's jobs and transfers ahead of routine ones;
``late_arrivals = "ignore"`` analyses a series once even when instances arrive later;
``pipeline`` names the analysis (``"ct-nodules"``, the only one today); ``enabled = false``.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom.datadict import tag_for_keyword

from dicom_node.routing import conditions

ACTIONS = ("analyse", "forward", "discard")
PIPELINES = ("ct-nodules",)
ROUTE_OUTPUTS = ("sr", "seg", "sc", "originals")
#: Rule priority -> the integer stored on jobs and transfers (claimed highest first).
PRIORITIES = {"urgent": 10, "routine": 0}
SENDER = "sender"

#: Keys that are not DICOM keywords: the association's, and facts derived from the series.
ASSOCIATION_KEYS = ("calling_ae", "called_ae", "source_host")
DERIVED_KEYS = ("image_count", "slice_thickness_mm", "eligible", "eligibility_reason")


def check_match_key(key: str) -> str:
    if key in ASSOCIATION_KEYS or key in DERIVED_KEYS:
        return key
    if tag_for_keyword(key) is None:
        raise ValueError(f"match key {key!r} is neither a DICOM keyword (e.g. Modality, BodyPartExamined) nor one "
                         f"of {', '.join(ASSOCIATION_KEYS + DERIVED_KEYS)}")
    return key


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
    enabled: bool = True
    description: str | None = Field(None, max_length=255)
    match: dict[str, Any] = Field(default_factory=dict,
                                  description="DICOM keyword (or calling_ae, called_ae, source_host, image_count, "
                                              "slice_thickness_mm, eligible, eligibility_reason) -> a glob, a "
                                              "/regular expression/, a number, a list (one of), {min=, max=} or "
                                              "{present=}; every condition must hold; {} matches every series")
    actions: list[Literal["analyse", "forward", "discard"]] = Field(min_length=1)
    destinations: list[str] = Field(default_factory=lambda: [SENDER],
                                    description='destination names, or "sender"; empty means the sender')
    outputs: dict[str, list[Literal["sr", "seg", "sc", "originals"]]] = Field(
        default_factory=dict, description="per destination (or sender): what it receives; default: the "
                                          "destination's outputs, plus the originals when the rule forwards")
    pipeline: Literal["ct-nodules"] = "ct-nodules"
    level: Literal["series", "study"] = "series"
    quiet_seconds: float | None = Field(None, gt=0, description="completion: seconds without a new instance")
    priority: Literal["urgent", "routine"] = "routine"
    late_arrivals: Literal["rerun", "ignore"] = "rerun"

    @field_validator("match")
    @classmethod
    def _match(cls, value: dict) -> dict:
        for key, cond in value.items():
            check_match_key(key)
            try:
                conditions.check(cond)
            except conditions.ConditionError as exc:
                raise ValueError(f"match.{key}: {exc}") from None
        return value

    @field_validator("actions")
    @classmethod
    def _actions(cls, value: list) -> list:
        return list(dict.fromkeys(value))

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, value: list) -> list:
        names = [v.strip() for v in value if v.strip()]
        return list(dict.fromkeys(names)) or [SENDER]

    @model_validator(mode="after")
    def _outputs_name_destinations(self) -> Rule:
        unknown = [k for k in self.outputs if k not in self.destinations]
        if unknown:
            raise ValueError(f"outputs name {unknown}, which are not among the rule's destinations {self.destinations}")
        return self

    @property
    def priority_value(self) -> int:
        return PRIORITIES[self.priority]

    def definition(self) -> dict:
        """What the database stores in ``routing_rules.definition`` (all but name and enabled)."""
        return self.model_dump(exclude={"name", "enabled"})


#: What the node does when no rule is stored: today's behaviour.
DEFAULT_RULE = Rule(name="default", description="no rule configured: analyse eligible series, results to the sender",
                    match={}, actions=["analyse"], destinations=[SENDER])
