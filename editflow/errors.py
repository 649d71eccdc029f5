"""The one family of errors a user can cause.

Each problem renders as one line: ``FILE[:LINE]: KEY.PATH: what is wrong (hint)``. The CLI
prints these without a traceback and exits 2; any other exception is a bug and keeps its
traceback. Lives at the package root so that ``engine``, ``stages`` and ``cache`` can all
raise it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with user input, located as precisely as we can.

    A ``note`` is not wrong, only worth saying (a choice a user may not have meant): the plan
    keeps it, ``plan`` and ``validate`` print it, and nothing is refused.
    """

    message: str
    file: str | None = None
    key: str | None = None
    line: int | None = None
    hint: str | None = None
    note: bool = False

    def render(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        key = f"{self.key}: " if self.key else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}{key}{self.message}{hint}"


def sort_problems(problems: list[Problem]) -> list[Problem]:
    """In file order (problems without a line last, in the order found)."""
    return sorted(problems, key=lambda problem: problem.line or 10**9)


def unique_problems(problems: list[Problem]) -> list[Problem]:
    """Each problem once (the same line can come from two validators), first one kept."""
    first: dict[str, Problem] = {}
    for problem in problems:
        first.setdefault(problem.render(), problem)
    return list(first.values())


class EditflowError(Exception):
    """An error the user can fix; carries one or more located problems."""

    def __init__(
        self,
        message: str | None = None,
        *,
        file: str | None = None,
        key: str | None = None,
        line: int | None = None,
        hint: str | None = None,
        problems: list[Problem] | None = None,
    ) -> None:
        self.problems = list(problems or [])
        if message is not None:
            self.problems.insert(0, Problem(message, file=file, key=key, line=line, hint=hint))
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(problem.render() for problem in self.problems)


class RecipeError(EditflowError):
    """A recipe (or a command-line override of it) is invalid."""


class CacheError(EditflowError):
    """The cache location cannot be used."""


class ModelUnavailableError(EditflowError):
    """A model reference cannot be resolved (for example offline and not downloaded)."""


class StageFailedError(EditflowError):
    """A stage raised a user-facing error while running; names the stage and its kind."""
