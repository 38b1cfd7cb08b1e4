"""A metric that could not run: why, and the command that fixes it. Reported, never silently 0."""

from __future__ import annotations

from dataclasses import dataclass

from vaeft.weights import MissingWeightsError


@dataclass(frozen=True)
class Unavailable:
    reason: str
    fetch: str | None = None  # the command that makes it available, if one exists

    def describe(self) -> str:
        return self.reason if self.fetch is None or self.fetch in self.reason else f"{self.reason}; fetch: {self.fetch}"

    def as_dict(self) -> dict[str, str | None]:
        return {"reason": self.reason, "fetch": self.fetch}

    @classmethod
    def from_missing(cls, err: MissingWeightsError) -> Unavailable:
        # No path: reports are versioned outputs and must not depend on where the checkout lives.
        return cls(reason=f"weights {err.name!r} not in the weight store",
                   fetch=f"vaeft weights pull {err.name}")
