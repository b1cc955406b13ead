"""Deployed prompts in the metering database: stored per owning key, so every replica sees them and a
restart keeps them. A server without keys keeps them in an in-memory database (shared, lost at exit).

Ids are derived from the owner and the prompt's content (`pr_` + 32 hex digits): the same prompt deployed
again by the same key gets the same id, so a retried upload never stores a copy; another key deploying the
same prompt gets another id. Ids of another key answer 404, and anything not shaped like an id answers 404
without a query (a malformed id never reaches the database, NUL characters included).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import StaticPool, create_engine, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from lmaas_protocol import ErrorCode, PromptInfo
from lmaas_server.errors import APIError, InvalidRequest
from lmaas_server.metering.keys import aware, now
from lmaas_server.metering.models import DeployedPrompt

ID_PATTERN = re.compile(r"pr_[0-9a-f]{32}")


def not_found(prompt_id: str, param: str = "prompt_id") -> APIError:
    shown = prompt_id if ID_PATTERN.fullmatch(prompt_id) else "with this id"
    return APIError(ErrorCode.NOT_FOUND, f"no deployed prompt {shown} for this key (GET /v1/prompts lists yours)",
                    param=param)  # fmt: skip


@dataclass(frozen=True)
class StoredPrompt:
    info: PromptInfo
    spec: bytes  # the PromptSpec's JSON


class PromptStore:
    def __init__(self, sessions: sessionmaker[Session], max_per_key: int, serialize: bool = False):
        self.sessions = sessions
        self.max_per_key = max_per_key
        # one shared in-memory connection (no keys): transactions of concurrent requests must not interleave
        self._lock = threading.Lock() if serialize else contextlib.nullcontext()

    @classmethod
    def in_memory(cls, max_per_key: int) -> PromptStore:
        """The store of a server without keys: an in-memory SQLite database, migrated like the real one."""
        from lmaas_server.metering.db import migrate, session_factory

        engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
        migrate(engine)
        return cls(session_factory(engine), max_per_key, serialize=True)

    def add(self, owner: int | None, spec: bytes, summary: dict[str, Any], model: str) -> PromptInfo:
        """Store a checked prompt (or find the same one stored before); 422 past the key's limit."""
        digest = hashlib.sha256(f"{owner}\0{model}\0".encode() + spec).hexdigest()[:32]
        prompt_id = "pr_" + digest
        row = DeployedPrompt(id=prompt_id, key_id=owner, model=model, summary=json.dumps(summary), spec=spec,
                             created_at=now())  # fmt: skip
        with self._lock:
            existing = self._info(owner, prompt_id)
            if existing is not None:
                return existing
            try:
                with self.sessions.begin() as session:
                    count = session.scalar(select(func.count()).select_from(DeployedPrompt).where(_owned(owner)))
                    if count >= self.max_per_key:
                        raise InvalidRequest(None, f"this key already keeps {count} deployed prompts, the limit; "
                                             "delete some first (DELETE /v1/prompts/{id})")  # fmt: skip
                    session.add(row)
            except IntegrityError:  # the same upload raced in (another replica): it is stored, as this one wanted
                existing = self._info(owner, prompt_id)
                if existing is None:
                    raise
                return existing
        return describe(row)

    def list(self, owner: int | None) -> list[PromptInfo]:
        query = select(DeployedPrompt.id, DeployedPrompt.model, DeployedPrompt.summary, DeployedPrompt.created_at)
        with self._lock, self.sessions() as session:
            rows = session.execute(query.where(_owned(owner)).order_by(DeployedPrompt.created_at.desc())).all()
        return [describe(row) for row in rows]

    def info(self, owner: int | None, prompt_id: str) -> PromptInfo:
        with self._lock:
            found = self._info(owner, prompt_id)
        if found is None:
            raise not_found(prompt_id)
        return found

    def get(self, owner: int | None, prompt_id: str) -> StoredPrompt:
        """The prompt with its spec (for classify: 404 names its `prompt` field) when it is this owner's."""
        if not ID_PATTERN.fullmatch(prompt_id):
            raise not_found(prompt_id, "prompt")
        with self._lock, self.sessions() as session:
            row = session.scalar(select(DeployedPrompt).where(DeployedPrompt.id == prompt_id, _owned(owner)))
        if row is None:
            raise not_found(prompt_id, "prompt")
        return StoredPrompt(describe(row), row.spec)

    def delete(self, owner: int | None, prompt_id: str) -> None:
        if not ID_PATTERN.fullmatch(prompt_id):
            raise not_found(prompt_id)
        with self._lock, self.sessions.begin() as session:
            deleted = session.execute(delete(DeployedPrompt).where(DeployedPrompt.id == prompt_id, _owned(owner)))
        if deleted.rowcount != 1:
            raise not_found(prompt_id)

    def _info(self, owner: int | None, prompt_id: str) -> PromptInfo | None:
        if not ID_PATTERN.fullmatch(prompt_id):
            return None
        query = select(DeployedPrompt.id, DeployedPrompt.model, DeployedPrompt.summary, DeployedPrompt.created_at)
        with self.sessions() as session:
            row = session.execute(query.where(DeployedPrompt.id == prompt_id, _owned(owner))).first()
        return None if row is None else describe(row)


def _owned(owner: int | None):
    return DeployedPrompt.key_id.is_(None) if owner is None else DeployedPrompt.key_id == owner


def describe(row) -> PromptInfo:
    """A row (or its listed columns) as the API shows it."""
    return PromptInfo(id=row.id, model=row.model, created_at=aware(row.created_at), **json.loads(row.summary))
