"""Typed configuration: one ``Settings`` object built by the CLI from ``config.toml`` and passed down.

Environment variables override the file: ``DICOM_NODE_NODE__PORT=11113``,
``DICOM_NODE_DATABASE__URL=postgresql://...`` (``__`` separates section and key).
Sources and destinations in the file seed the database on start; from then on the database (the
admin UI, API and CLI) is the authority for them.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dicom_node.routing.rules import Rule
from model.threads import available_cpus
# One validator per kind of value (``dicom_node.values``); re-exported here for the callers that
# import them from the configuration.
from dicom_node.values import OUTPUTS, check_ae_title, check_destination_target, check_outputs  # noqa: F401


class ConfigError(ValueError):
    """The configuration file is missing, not TOML, or has invalid values."""


def empty_is_none(value):
    """``""`` in the file or the environment means "not set" for optional paths."""
    return None if isinstance(value, str) and not value.strip() else value


#: ``[node] listeners = "auto"`` starts one listener process per usable core, at most this many
#: (more than four rarely pays: the database and the other stages need cores too).
AUTO_LISTENERS_MAX = 4


class NodeSection(BaseModel):
    ae_title: str = "DICOM_NODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)  # 0: any free port (tests)
    data_dir: Path = Path("var")
    #: "reject" (PS3.8 rejected-permanent, calling AE not recognised) or "accept" (any caller).
    unknown_callers: Literal["reject", "accept"] = "reject"
    max_pdu: int = Field(0, ge=0)
    #: Listener processes sharing the port (``SO_REUSEPORT``; Linux spreads new connections over
    #: them): ``serve`` starts this many, and with more than one each standalone ``listen`` sets
    #: the option and claims the port for this node (``dicom_node.port_share``: another node on
    #: the same port is refused). One process is bound by Python's GIL to about one core of
    #: C-STORE work. "auto": the cores this process may use (affinity, cgroup quota), at most
    #: ``AUTO_LISTENERS_MAX``. The limits below apply in each process.
    listeners: Literal["auto"] | int = Field("auto", union_mode="left_to_right", validate_default=True)

    @field_validator("listeners")
    @classmethod
    def _resolve_listeners(cls, v):
        if v == "auto":
            return min(available_cpus(), AUTO_LISTENERS_MAX)
        if not 1 <= v <= 64:
            raise ValueError("listeners must be 'auto' or an integer from 1 to 64")
        return v

    # Listener limits (docs/hardening/listener.md); seconds and bytes.
    #: Associations at once past a complete request (half-open connections do not count).
    max_associations: int = Field(64, ge=1)
    #: Associations at once from one peer host.
    max_associations_per_peer: int = Field(16, ge=1)
    #: From TCP connect until the A-ASSOCIATE-RQ is complete, in total (holds against a drip).
    association_request_timeout: float = Field(30.0, gt=0)
    #: Without traffic on an association, or while one PDU is still arriving.
    idle_timeout: float = Field(60.0, gt=0)
    #: Largest declared A-ASSOCIATE-RQ PDU length read (a usual request is 1-20 kB; 128 contexts
    #: each proposing all 45 transfer syntaxes pynetdicom knows is 148 kB).
    max_request_pdu: int = Field(256 * 1024, ge=1024)
    #: Largest instance kept, counted after inflating a deflated transfer syntax.
    max_dataset_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    #: /healthz answers 503 when the data_dir filesystem has less free space than this (MiB).
    min_free_disk_mb: float = Field(1024.0, ge=0)
    #: Each stage process writes a heartbeat row this often (seconds).
    heartbeat_seconds: float = Field(5.0, gt=0)
    #: /healthz calls a stage "stale" when its newest heartbeat is older than this (seconds).
    stage_stale_seconds: float = Field(30.0, gt=0)
    #: Stages that /healthz requires (503 when one has no fresh heartbeat on any host).
    required_stages: list[Literal["listen", "schedule", "work", "dispatch", "web"]] = [
        "listen", "schedule", "work", "dispatch"]

    _ae = field_validator("ae_title")(check_ae_title)


class DatabaseSection(BaseModel):
    url: str = ""  # empty: SQLite in data_dir


class WebSection(BaseModel):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: Signs session cookies and API tokens; empty means a random key kept in data_dir.
    secret_key: str = ""
    #: Mark cookies Secure even on plain-HTTP requests (behind a TLS proxy the app is not told about).
    force_secure_cookies: bool = False
    #: Login rate limits, per web process, over login_window_seconds: failed logins from one
    #: client for one user name, and from one client for any user name (then 429 + Retry-After).
    login_failures_per_user_and_client: int = Field(5, ge=1)
    login_failures_per_client: int = Field(20, ge=1)
    login_window_seconds: float = Field(300.0, gt=0)
    #: HTTPS: PEM certificate (chain) and private key; both empty: plain HTTP (e.g. behind a proxy).
    certificate: Path | None = None
    private_key: Path | None = None
    #: Reverse proxies whose X-Forwarded-For/-Proto are believed (IP addresses or CIDR); empty: none.
    trusted_proxies: list[str] = []

    _paths = field_validator("certificate", "private_key", mode="before")(empty_is_none)

    @model_validator(mode="after")
    def _https_pair(self) -> WebSection:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("[web] certificate and private_key go together: give both for HTTPS, or neither")
        return self


class TLSSection(BaseModel):
    """DICOM TLS (PS3.15 Annex B): a TLS listener beside (or instead of) the plain port, and the
    node's identity and trust as SCU towards destinations with ``tls = true``. PEM files."""

    enabled: bool = False  # the TLS listener; destinations with tls = true use this section either way
    port: int = Field(2762, ge=0, le=65535)  # 2762: the registered DICOM-TLS port; 0: any free port (tests)
    plain: bool = True  # false: no plain-TCP listener on [node] port, TLS only
    certificate: Path | None = None  # the node's certificate (chain), presented to callers
    private_key: Path | None = None  # unencrypted PEM key of ``certificate``
    ca_certificates: Path | None = None  # PEM bundle trusted for peers; None: the system's store (SCU only)
    require_client_certificate: bool = False  # callers must present a certificate signed by ca_certificates
    min_version: Literal["1.2", "1.3"] = "1.2"
    client_certificate: Path | None = None  # as SCU; None: ``certificate``
    client_private_key: Path | None = None  # as SCU; None: ``private_key``
    verify_hostname: bool = True  # a destination's certificate must name its host (DNS name or IP)
    handshake_timeout_seconds: float = Field(10.0, gt=0)

    _paths = field_validator("certificate", "private_key", "ca_certificates", "client_certificate",
                             "client_private_key", mode="before")(empty_is_none)

    @model_validator(mode="after")
    def _complete(self) -> TLSSection:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("[tls] enabled needs certificate and private_key")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("[tls] require_client_certificate needs ca_certificates (whom to trust)")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("[tls] certificate and private_key go together")
        if (self.client_certificate is None) != (self.client_private_key is None):
            raise ValueError("[tls] client_certificate and client_private_key go together")
        if not self.plain and not self.enabled:
            raise ValueError("[tls] plain = false needs enabled = true (the node would not listen at all)")
        return self


class CompletionSection(BaseModel):
    """When a series is complete (``dicom_node.completion``), and what late arrivals do."""

    #: Seconds without a new instance before a series is complete (after its associations end).
    quiet_seconds: float = Field(10.0, gt=0)
    #: An inbound association still open does not hold a series back longer than this (seconds
    #: since the association began): a sender that never releases cannot block it for ever.
    max_open_seconds: float = Field(1800.0, gt=0)
    #: Instances that arrive after a series' results exist: "rerun" (a new job whose SR names the
    #: SR it replaces) or "ignore" (the results stand). A rule or a source may say otherwise.
    late: Literal["rerun", "ignore"] = "rerun"


class EligibilitySection(BaseModel):
    min_slices: int = Field(16, ge=1)
    max_slice_spacing_mm: float = Field(3.0, gt=0)
    max_slice_thickness_mm: float = Field(3.0, gt=0)


class SourceEntry(BaseModel):
    ae_title: str
    host: str | None = None
    description: str | None = None
    #: The destination(s) "sender" means for this source (routing); a string or a list of names.
    return_to: list[str] = []
    #: Late-arrival policy for studies from this source ("rerun" | "ignore"); [completion] late if unset.
    late: Literal["rerun", "ignore"] | None = None
    #: Quiet period (seconds) that completes a series from this source; [completion] quiet_seconds
    #: if unset; a matching rule's quiet_seconds wins over both. Seeds ``sources.quiet_seconds``.
    quiet_seconds: float | None = Field(None, ge=0, le=86400)

    _ae = field_validator("ae_title")(check_ae_title)

    @field_validator("return_to", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value


class DestinationEntry(BaseModel):
    """``[[destinations]]``: ``kind = "dicom"`` (C-STORE to ae_title@host:port, the default) or
    ``kind = "dicomweb"`` (STOW-RS to ``url``, the DICOMweb base URL, e.g.
    ``http://pacs:8042/dicom-web``); see ``dicom_node.destinations``."""

    name: str = Field(min_length=1, max_length=64)
    kind: Literal["dicom", "dicomweb"] = "dicom"
    ae_title: str = ""
    host: str = ""
    port: int = Field(0, ge=0, le=65535)
    url: str | None = None
    outputs: list[str] = ["sr", "seg"]
    tls: bool = False  # DICOM TLS with the [tls] client identity and trust
    #: DICOMweb: an Authorization header value, or the name of an environment variable holding it.
    auth_header: str | None = None
    auth_header_env: str | None = None
    #: A peer that accepts no Comprehensive 3D SR: send a Comprehensive SR without SCOORD3D
    #: ("comprehensive", the default) or fail that object with its reason ("fail").
    sr_fallback: Literal["comprehensive", "fail"] = "comprehensive"

    _outputs = field_validator("outputs")(check_outputs)

    @model_validator(mode="after")
    def _by_kind(self) -> DestinationEntry:
        self.ae_title, self.host, self.port, self.url = check_destination_target(
            self.name, self.kind, self.ae_title, self.host, self.port, self.url)
        return self

    @property
    def options(self) -> dict:
        """The kind options stored in ``destinations.options``."""
        out = {"sr_fallback": self.sr_fallback}
        if self.auth_header:
            out["auth_header"] = self.auth_header
        if self.auth_header_env:
            out["auth_header_env"] = self.auth_header_env
        return out


class WorkerSection(BaseModel):
    lease_seconds: float = Field(60.0, gt=0)
    poll_seconds: float = Field(1.0, gt=0)
    #: On SIGTERM a running inference may finish for this long (seconds); after that the job is
    #: put back in the queue, uncharged, and the worker exits.
    stop_grace_seconds: float = Field(120.0, ge=0)
    #: A job reclaimed after an expired lease (its worker died) this many times is failed: a
    #: poison job that kills the worker every time. Such reclaims do not use up max_attempts.
    max_lease_expiries: int = Field(10, ge=1)


class DispatchSection(BaseModel):
    max_attempts: int = Field(12, ge=1)
    backoff_base_seconds: float = Field(5.0, gt=0)
    backoff_max_seconds: float = Field(600.0, gt=0)
    timeout_seconds: float = Field(30.0, gt=0)


class ModelSection(BaseModel):
    weights: Path | None = None  # None: the weights that ship with the package
    threshold: float | None = None  # None: the validated operating point
    device: str = "cpu"
    #: CPU threads of one inference worker: "auto" (the cores this process may use: CPU
    #: affinity and cgroup quota) or a number; 1 when several workers share a host.
    threads: Literal["auto"] | int = Field("auto", union_mode="left_to_right")
    #: Network runtime: "auto" (ONNX Runtime when installed and matching torch), "torch", "onnx".
    runtime: Literal["auto", "torch", "onnx"] = "auto"

    @field_validator("threads")
    @classmethod
    def _threads_positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("threads must be 'auto' or a positive integer")
        return v


class RetentionSection(BaseModel):
    """Deleting old studies (files and index rows, audited); a study with pending work is never deleted."""

    #: Delete studies whose last instance arrived more than this many days ago; 0: off.
    max_age_days: float = Field(0.0, ge=0)
    #: While free space on the data folder's file system is below this percentage, delete the
    #: oldest studies; 0: off.
    min_free_disk_percent: float = Field(0.0, ge=0, lt=100)
    #: Seconds between retention passes (run by the schedule stage).
    interval_seconds: float = Field(3600.0, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DICOM_NODE_", env_nested_delimiter="__", extra="forbid")

    node: NodeSection = NodeSection()
    database: DatabaseSection = DatabaseSection()
    web: WebSection = WebSection()
    tls: TLSSection = TLSSection()
    completion: CompletionSection = CompletionSection()
    eligibility: EligibilitySection = EligibilitySection()
    worker: WorkerSection = WorkerSection()
    dispatch: DispatchSection = DispatchSection()
    model: ModelSection = ModelSection()
    retention: RetentionSection = RetentionSection()
    sources: list[SourceEntry] = []
    destinations: list[DestinationEntry] = []
    #: Routing rules (``dicom_node.routing.rules.Rule``): seed the database while it holds none.
    rules: list[Rule] = []

    @model_validator(mode="after")
    def _unique(self) -> Settings:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError(f"destination names must be unique, got {names}")
        rules = [r.name for r in self.rules]
        if len(rules) != len(set(rules)):
            raise ValueError(f"rule names must be unique, got {rules}")
        known = set(names) | {"sender"}
        for src in self.sources:
            unknown = [n for n in src.return_to if n not in names]
            if unknown:
                raise ValueError(f"source {src.ae_title}: return_to names unknown destination(s) {unknown}")
        for rule in self.rules:
            unknown = [n for n in rule.destinations if n not in known]
            if unknown:
                raise ValueError(f"rule {rule.name}: unknown destination(s) {unknown}; "
                                 f"[[destinations]] names {names} or \"sender\"")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):  # noqa: ANN001
        # Environment variables win over the file, which arrives as init kwargs.
        return (env_settings, init_settings)

    @property
    def database_url(self) -> str:
        from storage.db import sqlite_url

        return self.database.url or sqlite_url(self.node.data_dir)


def load_settings(path: Path | None) -> Settings:
    """Read ``path`` (TOML). Relative ``data_dir`` and weights are resolved against the file's folder."""
    data: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
        base = path.resolve().parent
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()]
        raise ConfigError(f"configuration {path or '(defaults)'} is invalid:\n" + "\n".join(lines)) from exc
    if not settings.node.data_dir.is_absolute():
        settings.node.data_dir = (base / settings.node.data_dir).resolve()
    if settings.model.weights is not None and not settings.model.weights.is_absolute():
        settings.model.weights = (base / settings.model.weights).resolve()
    for section, key in _CERTIFICATE_PATHS:
        value = getattr(getattr(settings, section), key)
        if value is not None and not value.is_absolute():
            setattr(getattr(settings, section), key, (base / value).resolve())
    return settings


#: Certificate and key paths, resolved against the configuration file's folder like data_dir.
_CERTIFICATE_PATHS = [("tls", "certificate"), ("tls", "private_key"), ("tls", "ca_certificates"),
                      ("tls", "client_certificate"), ("tls", "client_private_key"),
                      ("web", "certificate"), ("web", "private_key")]
