"""Error types of parallel/; each says what went wrong and on which rank."""

from __future__ import annotations

from standin.errors import StandInError


class ParallelConfigError(StandInError, ValueError):
    """The requested mesh does not fit the world size or the model (e.g. heads vs Ulysses degree)."""


class CollectiveError(StandInError):
    """A collective failed or timed out. The process group is unusable afterwards: rebuild it."""


class PeerFailedError(StandInError):
    """Another rank reported a failure at an agreement point; raised on the ranks that did not fail."""


class RequestFailedError(StandInError):
    """A request failed on at least one rank; every rank raises this, the group stays usable.

    `failures` maps rank → the error message that rank saw.
    """

    def __init__(self, failures: dict[int, str]) -> None:
        self.failures = dict(sorted(failures.items()))
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in self.failures.items())
        super().__init__(f"request failed on {len(self.failures)} rank(s): {detail}")
