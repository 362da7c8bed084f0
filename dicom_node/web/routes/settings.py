"""Runtime settings: the node's AE title and port, completion and eligibility.

Stored in the database; they override config.toml and the stages re-read them, so a change
takes effect without a restart. One model and one writer: ``dicom_node.app.settings``.
"""
from __future__ import annotations

from fastapi import APIRouter

from dicom_node.app import settings as app_settings
from dicom_node.web import schemas
from dicom_node.web.deps import DB, AdminUser, NodeDep

router = APIRouter(prefix="/api/settings", tags=["settings"])


@router.get("", response_model=dict, summary="Current runtime settings (database override, else config.toml)")
def get_settings(s: DB, node: NodeDep, user: AdminUser) -> dict:
    return app_settings.current(node, s)


@router.patch("", response_model=dict, summary="Change runtime settings (dotted keys, e.g. 'node.ae_title')")
def update_settings(body: schemas.RuntimeSettings, s: DB, node: NodeDep, user: AdminUser) -> dict:
    result = app_settings.update(node, s, user.username, body)
    s.commit()
    return result
