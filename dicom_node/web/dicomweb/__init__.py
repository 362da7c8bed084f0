"""DICOMweb under ``/dicom-web``: QIDO-RS (``qido``), WADO-RS and WADO-URI (``wado``, with the
series metadata cache in ``metadata``), STOW-RS (``stow``, through the listener's store step).

Credentials and roles: ``auth``. Answers: ``responses`` (DICOM JSON, streamed multipart).
"""
from __future__ import annotations

from fastapi import APIRouter, FastAPI

from dicom_node.web.dicomweb import qido, stow, wado
from dicom_node.web.dicomweb.metadata import MetadataCache

PREFIX = "/dicom-web"


def install(app: FastAPI, node) -> None:  # noqa: ANN001 - dicom_node.node.Node
    """Mount the DICOMweb routes on ``app`` and give it the series metadata cache."""
    app.state.dicomweb_metadata = MetadataCache(node)
    router = APIRouter(prefix=PREFIX, tags=["DICOMweb"])
    for module in (qido, wado, stow):
        router.include_router(module.router)
    app.include_router(router)
