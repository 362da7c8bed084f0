"""Cost of a routing decision, against a baseline measured in the same run.

Baseline: no rule stored (the built-in default rule). Then a 20-rule set of globs, regular
expressions, lists and ranges on the same facts (pasted: no file reads). Prints microseconds per
decision (the scheduler makes one per complete series).

    PYTHONPATH=$PWD python benchmarks/bench_routing.py [--decisions 20000]
"""
from __future__ import annotations

import argparse
import time

from dicom_node.routing.evaluate import decide, facts_from_attributes
from dicom_node.routing.rules import Rule


class _Dest:
    def __init__(self, i: int):
        self.id, self.name, self.outputs, self.enabled = i, f"pacs_{i}", ["sr", "seg"], True


def rule_set(n: int) -> list[Rule]:
    rules = []
    for i in range(n - 1):
        rules.append(Rule(name=f"r{i}", match={"Modality": ["MR", "US", "XA"][i % 3], "calling_ae": f"SITE{i}_*",
                                               "StudyDescription": f"/(?i)protocol {i}/", "image_count": {"min": i}},
                          actions=["forward"], destinations=["pacs_1"]))
    rules.append(Rule(name="chest-ct", match={"Modality": "CT", "BodyPartExamined": "/CHEST|LUNG/",
                                              "calling_ae": "CT_*", "slice_thickness_mm": {"max": 3}},
                      actions=["analyse"], destinations=["sender"]))
    return rules


def per_decision_us(rules: list[Rule], n: int) -> float:
    dests = [_Dest(i) for i in range(1, 4)]
    attrs = {"Modality": "CT", "BodyPartExamined": "CHEST", "calling_ae": "CT_A", "SliceThickness": "1.25",
             "StudyDescription": "CHEST CT", "image_count": 133, "eligible": True}
    t0 = time.perf_counter()
    for _ in range(n):
        decide(rules, facts_from_attributes(attrs), dests, ["pacs_2"])
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--decisions", type=int, default=20000)
    args = p.parse_args()
    base = per_decision_us([], args.decisions)
    twenty = per_decision_us(rule_set(20), args.decisions)
    print(f"default rule (baseline): {base:8.1f} us per decision")
    print(f"20 rules               : {twenty:8.1f} us per decision ({twenty / base:.1f} x baseline)")


if __name__ == "__main__":
    main()
