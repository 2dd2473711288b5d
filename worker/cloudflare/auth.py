"""Credentials that cannot leak: the secret parts never appear in a repr, str, log or error."""

from __future__ import annotations

from dataclasses import dataclass


class Secret:
    """A string that prints as ``'***'``; ``reveal()`` is the only way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class Credentials:
    """An API token (Bearer), or the legacy e-mail + global API key pair."""

    token: Secret | None = None
    email: str | None = None
    key: Secret | None = None

    def headers(self) -> dict[str, str]:
        if self.token:
            return {"Authorization": f"Bearer {self.token.reveal()}"}
        if self.email and self.key:
            return {"X-Auth-Email": self.email, "X-Auth-Key": self.key.reveal()}
        return {}

    def secrets(self) -> list[str]:
        """The raw secret values, for the log redactor."""
        return [s.reveal() for s in (self.token, self.key) if s]
