"""What the use cases need from a function instance, as a protocol.

Every handler takes `(call, ports)`: shared.runtime.Runtime provides all of it in production, and
a test can hand a use case only the parts it exercises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from shared.adapters.auth import JwtVerifier
    from shared.adapters.db import Database
    from shared.adapters.dtma import DtmaClient
    from shared.adapters.tasks import Queue
    from shared.core.config import Settings


class Ports(Protocol):
    @property
    def settings(self) -> Settings: ...
    @property
    def db(self) -> Database: ...
    @property
    def verifier(self) -> JwtVerifier: ...
    @property
    def dtma(self) -> DtmaClient: ...
    @property
    def tasks(self) -> Queue: ...
