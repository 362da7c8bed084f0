"""Rules x facts -> ``Decision``: which rules matched, which condition failed, what happens where.

Every enabled rule is evaluated, in order, and every one of its conditions (so a non-match lists
all failed conditions, not only the first). The actions and destinations of all matching rules
are united; the most urgent priority, the longest quiet period and the widest trigger level
(study over series) among them apply.

Destinations: ``"sender"`` means the destinations named by the sending source's ``return_to``,
or every enabled destination when the source names none (or the caller is not a configured
source). A destination receives, per rule, the outputs the rule names for it, else its own
outputs; results (sr, seg, sc) only when the rule analyses, the originals when the rule forwards
or names ``originals`` for it. A destination that does not exist or is disabled is skipped and
said so in the decision's notes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from dicom_node.routing import conditions
from dicom_node.routing.facts import Facts
from dicom_node.routing.rules import DEFAULT_RULE, SENDER, Rule

RESULT_OUTPUTS = ("sr", "seg", "sc")


class DestinationLike(Protocol):
    id: int
    name: str
    outputs: list
    enabled: bool


@dataclass
class RuleResult:
    name: str
    matched: bool
    failed: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    destinations: list[str] = field(default_factory=list)  # resolved names, when matched

    def as_dict(self) -> dict:
        return {"name": self.name, "matched": self.matched, "failed": self.failed, "passed": self.passed,
                "actions": self.actions, "destinations": self.destinations}


@dataclass
class Decision:
    """What routing decided for one series (or would, in a dry run)."""

    results: list[RuleResult]
    default: bool = False  # no rule stored: the built-in default rule decided
    analyse: bool = False
    forward: bool = False
    discard: bool = False
    #: destination id -> outputs it gets (subset of sr, seg, sc, originals)
    outputs: dict[int, list[str]] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    priority: int = 0
    level: str = "series"
    quiet_seconds: float | None = None
    late_arrivals: str = "rerun"
    pipeline: str = "ct-nodules"
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # the values the rules looked at

    @property
    def matched(self) -> list[str]:
        return [r.name for r in self.results if r.matched]

    @property
    def actions(self) -> list[str]:
        return [a for a, on in (("analyse", self.analyse), ("forward", self.forward), ("discard", self.discard)) if on]

    def result_destinations(self) -> dict[int, list[str]]:
        """destination id -> result kinds (sr, seg, sc) when analysed."""
        out = {d: [o for o in outs if o in RESULT_OUTPUTS] for d, outs in self.outputs.items()} if self.analyse else {}
        return {d: o for d, o in out.items() if o}

    def forward_destinations(self) -> list[int]:
        return [d for d, outs in self.outputs.items() if "originals" in outs]

    def destination_names(self) -> list[str]:
        return sorted({self.names[d] for d in self.outputs})

    def summary(self) -> str:
        """One line for the study page and the worklist: what happens, and why."""
        if not self.matched:
            failed = "; ".join(f"{r.name}: {', '.join(r.failed)}" for r in self.results if r.failed)
            return f"kept, not analysed: no routing rule matched ({failed or 'no enabled rule'})"
        parts = []
        results = self.result_destinations()
        if self.analyse:
            where = ", ".join(f"{self.names[d]} ({'+'.join(o)})" for d, o in results.items()) or "no destination"
            parts.append(f"analyse ({self.pipeline}), results to {where}")
        forwards = self.forward_destinations()
        if forwards:
            parts.append("originals forwarded to " + ", ".join(self.names[d] for d in forwards))
        elif self.forward:
            parts.append("forward: no destination")
        if self.discard:
            parts.append("discarded" + (" once the other actions are done" if self.analyse or forwards else ""))
        rules = "default rule" if self.default else "rule" + ("s " if len(self.matched) > 1 else " ") + ", ".join(self.matched)
        text = "; ".join(parts) + f" [{rules}]"
        if self.notes:
            text += " (" + "; ".join(self.notes) + ")"
        return text

    def as_dict(self) -> dict:
        return {"matched": self.matched, "default": self.default, "actions": self.actions,
                "destinations": {self.names[d]: o for d, o in self.outputs.items()},
                "priority": self.priority, "level": self.level, "quiet_seconds": self.quiet_seconds,
                "late_arrivals": self.late_arrivals, "notes": self.notes, "summary": self.summary(),
                "facts": {k: v for k, v in self.facts.items() if isinstance(v, (str, int, float, bool, list, type(None)))},
                "rules": [r.as_dict() for r in self.results]}


def match_rule(rule: Rule, facts: Facts) -> RuleResult:
    result = RuleResult(name=rule.name, matched=False)
    for key, cond in rule.match.items():
        outcome = conditions.test(key, cond, facts.get(key))
        (result.passed if outcome.ok else result.failed).append(outcome.reason)
    result.matched = not result.failed
    return result


def _sender(destinations: list[DestinationLike], return_to: list[str] | None, notes: list[str]) -> list[DestinationLike]:
    enabled = [d for d in destinations if d.enabled]
    if not return_to:
        return enabled
    by_name = {d.name: d for d in destinations}
    chosen = []
    for name in return_to:
        d = by_name.get(name)
        if d is None or not d.enabled:
            notes.append(f"return_to destination {name!r} {'is disabled' if d else 'does not exist'}")
        else:
            chosen.append(d)
    return chosen


def decide(rules: list[Rule], facts: Facts, destinations: list[DestinationLike],
           return_to: list[str] | None = None) -> Decision:
    """Evaluate ``rules`` (the stored ones, in order; an empty list means the default rule) on
    ``facts``; ``return_to``: the sending source's destination names ("sender")."""
    default = not rules
    active = [DEFAULT_RULE] if default else [r for r in rules if r.enabled]
    decision = Decision(results=[], default=default)
    by_name = {d.name: d for d in destinations}
    matched_rules: list[Rule] = []
    for rule in active:
        result = match_rule(rule, facts)
        decision.results.append(result)
        if not result.matched:
            continue
        matched_rules.append(rule)
        result.actions = list(rule.actions)
        forward = "forward" in rule.actions
        analyse = "analyse" in rule.actions
        decision.analyse |= analyse
        decision.forward |= forward
        decision.discard |= "discard" in rule.actions
        for name in rule.destinations:
            if name == SENDER:
                targets = _sender(destinations, return_to, decision.notes)
            else:
                d = by_name.get(name)
                if d is None or not d.enabled:
                    decision.notes.append(f"rule {rule.name}: destination {name!r} "
                                          f"{'is disabled' if d else 'does not exist'}")
                    continue
                targets = [d]
            for d in targets:
                explicit = rule.outputs.get(name)
                if explicit is not None:
                    outs = [o for o in explicit if o == "originals" or analyse]
                else:
                    outs = [o for o in (d.outputs or []) if analyse and o in RESULT_OUTPUTS]
                    outs += ["originals"] if forward else []
                if not outs:
                    continue
                merged = decision.outputs.setdefault(d.id, [])
                merged.extend(o for o in outs if o not in merged)
                decision.names[d.id] = d.name
                if d.name not in result.destinations:
                    result.destinations.append(d.name)
    if matched_rules:
        decision.priority = max(r.priority_value for r in matched_rules)
        decision.level = "study" if any(r.level == "study" for r in matched_rules) else "series"
        quiet = [r.quiet_seconds for r in matched_rules if r.quiet_seconds is not None]
        decision.quiet_seconds = max(quiet) if quiet else None
        decision.late_arrivals = "ignore" if all(r.late_arrivals == "ignore" for r in matched_rules) else "rerun"
    return decision


def facts_from_attributes(attributes: dict[str, Any]) -> Facts:
    """Facts from a pasted attribute set (dry run): the keys as given, nothing read from files."""
    return Facts(dict(attributes))
