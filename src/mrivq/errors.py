"""Errors a user can act on.

Anything raised as a :class:`UserError` is reported by the CLI as one line on stderr
with exit status 2 and no traceback. Its message says what was wrong, which file or
key, and what to do. Every other exception is a bug and keeps its traceback.
"""

import signal
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: a config key, a file, a folder, a checkpoint."""


class ConfigError(UserError):
    """A config file or ``--set`` override that does not validate."""


class BadFileError(UserError):
    """One input file that cannot be used; ``path`` names it."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a finished step and a saved last checkpoint."""

    def __init__(self, signum: int, step: int, run_dir: Path, *, checkpoint: Path | None = None,
                 command: str = "mrivq train --resume"):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        self.exit_status = 128 + signum  # 130 for SIGINT, 143 for SIGTERM
        saved = checkpoint or Path(run_dir) / "models" / "last.pt"
        super().__init__(f"{signal.Signals(signum).name} at step {step}: saved {saved}; "
                         f"continue with: {command} {run_dir}")
