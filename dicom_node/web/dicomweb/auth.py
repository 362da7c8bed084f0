"""Who may use DICOMweb: the API's credentials (``dicom_node.web.deps``) with DICOMweb's roles.

A bearer token from ``POST /api/token``, or the page session cookie for safe methods (GET, HEAD:
the viewer in the browser); none gives 401, the wrong role 403. Radiologists and admins read
(QIDO-RS, WADO-RS); admins and ``sender`` accounts store (STOW-RS, bearer token only, so a page
cannot be tricked into storing: no CSRF).
"""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from dicom_node.web.deps import require_api
from storage.models import Role, User

READ_ROLES = (Role.ADMIN, Role.RADIOLOGIST)
STORE_ROLES = (Role.ADMIN, Role.SENDER)

Reader = Annotated[User, Depends(require_api(*READ_ROLES))]
Storer = Annotated[User, Depends(require_api(*STORE_ROLES))]
