"""Routing: which received series are analysed, forwarded or discarded, and where results go.

Rules (``rules.Rule``) live in the database (``routing_rules``), seeded from ``[[rules]]`` in
config.toml while that table is empty (``app.rules.seed``), and are re-read at every decision,
so a change in the admin pages, the API or the CLI applies to the next series without a restart.
Rules are evaluated in order and *each* match's actions run (the union of their actions and
destinations); a series that matches no rule is kept, not analysed, and shown with the reason
(every rule's failed condition). With no rule at all the node behaves as before routing existed:
eligible series are analysed and results go to the sender (``[[sources]] return_to``, or every
destination when the source names none).

Modules: ``conditions`` (one condition: glob, /regex/, one-of, range, present), ``rules`` (the
rule model), ``facts`` (the values a series is matched on), ``evaluate`` (rules x facts ->
``Decision``), ``store`` (reading the stored rules; changes are ``dicom_node.app.rules``, audited), ``apply`` (what the scheduler calls:
record the decision, queue forwards, discard), ``dryrun`` (what would happen, without doing it).
"""
from dicom_node.routing.rules import DEFAULT_RULE, PRIORITIES, Rule

__all__ = ["DEFAULT_RULE", "PRIORITIES", "Rule"]
