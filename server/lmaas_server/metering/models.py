"""Tables of the metering database (SQLAlchemy 2.0). Changes go through an Alembic migration."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)  # shown after creation; the secret never is
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the whole key
    name: Mapped[str] = mapped_column(String(200), default="")
    budget: Mapped[int] = mapped_column(BigInteger)  # calls
    used: Mapped[int] = mapped_column(BigInteger, default=0)  # calls reserved or settled
    token_budget: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    tokens_used: Mapped[int] = mapped_column(BigInteger, default=0)
    rate_limit: Mapped[float | None] = mapped_column(Float, nullable=True)  # requests per second
    rate_tokens: Mapped[float] = mapped_column(Float, default=0.0)  # token bucket, shared by all replicas
    rate_updated: Mapped[float] = mapped_column(Float, default=0.0)  # unix time of the bucket's last update
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LedgerEntry(Base):
    """One row per charged request: reserved before the work, then settled or refunded."""

    __tablename__ = "ledger"
    __table_args__ = (
        UniqueConstraint("key_id", "idempotency_key", name="uq_ledger_idempotency"),
        Index("ix_ledger_status_created", "status", "created_at"),
        Index("ix_ledger_key_created", "key_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    request_id: Mapped[str] = mapped_column(String(64))
    endpoint: Mapped[str] = mapped_column(String(64))
    calls: Mapped[int] = mapped_column(BigInteger)
    tokens: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))  # reserved | settled | refunded
    http_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    replica: Mapped[str] = mapped_column(String(128))
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    response: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # replayed on a retry
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)  # sha256 of the body (0002)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DeployedPrompt(Base):
    """A tuned prompt stored for POST /v1/classify (0003): shared by every replica, kept across restarts."""

    __tablename__ = "prompts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # pr_<hex>, derived from owner and content
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)  # the owner
    model: Mapped[str] = mapped_column(String(200))  # the served model it was checked against
    summary: Mapped[str] = mapped_column(Text)  # JSON: name, labels, template, length, forms (listings read only this)
    spec: Mapped[bytes] = mapped_column(LargeBinary)  # the PromptSpec as JSON (tensors as base64 little-endian)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
