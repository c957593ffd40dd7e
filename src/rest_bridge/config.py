"""Settings of the REST bridge, read from the environment (``EVENTS_*``) or flags."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from events_server.config import ENV_PREFIX, LogLevel
from events_server.logs import IpMode


class BridgeSettings(BaseSettings):
    """Everything the bridge needs; validated once at start-up and passed in."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    grpc_target: str = Field(
        "127.0.0.1:50051", description="The events-server to call (host:port, or unix:/path)."
    )
    http_host: str = Field("127.0.0.1", description="Address the bridge listens on.")
    http_port: int = Field(8000, ge=0, le=65535, description="Port the bridge listens on.")
    workers: int = Field(1, ge=1, le=64, description="Bridge processes (uvicorn workers).")
    grpc_timeout_seconds: float = Field(
        5.0, gt=0, description="Deadline of each CreateEvents call to the server, seconds."
    )
    retry_after_seconds: int = Field(
        1, ge=0, description="Retry-After sent with 503 and 429 answers, seconds."
    )
    log_level: LogLevel = Field("INFO", description="Python logging level.")
    log_client_ip: IpMode = Field(
        "truncated",
        description="Client IPs in access logs: full, truncated (IPv4 /24, IPv6 /48) or none.",
    )
    readiness_timeout_seconds: float = Field(
        1.0, gt=0, description="Deadline of the health check behind /readyz, seconds."
    )
