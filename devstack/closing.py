"""`with Thing() as thing:` for the local stack's start/stop services (servers, agents, emulators)."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class StartStop:
    """A service that `start()`s (returning itself) and `stop()`s; usable as a context manager."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
