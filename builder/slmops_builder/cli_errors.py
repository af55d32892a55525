"""The builder's commands' error handling: one line on stderr and an exit code, never a traceback.

`slmops_builder.cli` (keys, import, build, inspect, verify) and `slmops_builder.train.cli` (training
commands) both report through `fail` and wrap their work in `user_errors()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["EXIT_GATES_FAILED", "EXIT_USER_ERROR", "EXIT_VERIFY_FAILED", "err_console", "fail", "user_errors"]

EXIT_USER_ERROR = 1
EXIT_VERIFY_FAILED = 3
EXIT_GATES_FAILED = 4

err_console = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print `error: message` on stderr and exit with `code`."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can cause into one line and an exit code, never a traceback."""
    from pydantic import ValidationError

    from slmops_builder.engines import ConversionError
    from slmops_builder.evaluate import EvaluationError
    from slmops_builder.importer import ModelImportError
    from slmops_builder.keys import KeyFileError
    from slmops_builder.profiles import UnknownProfileError
    from slmops_builder.train.adapters import AdapterExportError
    from slmops_builder.train.hf_models import QLoRAUnavailable
    from slmops_builder.train.olive_engine import OliveEngineError
    from slmops_protos.manifests import PackageError

    try:
        yield
    except PackageError as exc:
        fail(f"package rejected: {exc.reason}", EXIT_VERIFY_FAILED)
    except (KeyFileError, UnknownProfileError, ModelImportError, ConversionError, EvaluationError) as exc:
        fail(str(exc))
    except (QLoRAUnavailable, AdapterExportError, OliveEngineError) as exc:
        fail(str(exc))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        fail(f"bad settings: {where}: {msg}" if where else f"bad settings: {msg}")
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as exc:
        fail(str(exc))
