"""The project's single user-facing error type.

Every mistake a user can make (a missing slide, a checkpoint of another
architecture, a dataset folder of the wrong layout...) is raised as a
:class:`WsiPipelineError` whose message names the file, what is wrong and how to
fix it. The CLI prints such errors without a traceback and exits with code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from os import PathLike


class WsiPipelineError(Exception):
    """A problem the user can fix: the message says which file, what and how.

    Subclasses only exist so callers can catch one layer's problems; the CLI
    treats them all alike.
    """

    def __init__(self, path: str | PathLike[str] | None, problem: str, fix: str | None = None) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        self.fix = fix
        parts = [f"{self.path}: {problem}" if self.path else problem]
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__(" ".join(parts))

    def __reduce__(self) -> tuple[type, tuple[str | None, str, str | None]]:
        # Errors raised on Dask workers travel back pickled: keep the three parts.
        return (type(self), (self.path, self.problem, self.fix))


class SlideError(WsiPipelineError):
    """A slide or image that cannot be opened or read as asked."""


class ModelError(WsiPipelineError):
    """A checkpoint that cannot be loaded, or a model used the wrong way."""


class DataError(WsiPipelineError):
    """A dataset, label file or prediction that does not fit what is expected."""


class ConfigError(WsiPipelineError):
    """An option or configuration file with an invalid value."""


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop (SIGTERM from a scheduler, SIGINT from Ctrl-C).

    A ``KeyboardInterrupt`` so that every ``except Exception`` lets it through and every
    ``finally`` (partial folders removed, process list written, cluster closed) still runs.
    """

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        super().__init__(self.name)

    def describe(self) -> str:
        return self.name

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by a signal: 128 + its number."""
        return 128 + self.signum
