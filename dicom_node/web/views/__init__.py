"""The web's read side: queries and presenters (rows -> ``web.schemas``), no writes.

``studies``: the worklist, the study page (with why a series still waits), findings and their
export; ``queues``: the job and transfer queues. ``web.services`` re-exports their names.
"""
