"""The one error policy of every entry point: ``coopnets <command>``, ``python -m coopnets.train``,
``hub/build_zoo.py`` and ``benchmarks/*.py`` all run their ``main`` through :func:`run_entry`.

Inside it:

* an **expected failure** (:func:`expected_message`: a bad setting, a missing or foreign
  file, a checkpoint that cannot be read, the network down, an optional extra not
  installed) ends the program with **one line** on stderr, ``PROG: error: ...``, and exit
  code 2. The raiser's message names the setting, the value and the valid choices
  (:func:`bad_value` spells that sentence);
* an **argparse error** is two lines: a one-line usage and the error (no 28-line usage);
* a **network failure** is one line naming the host; huggingface_hub's retry messages
  are kept quiet (the retries still happen; ``HF_HUB_VERBOSITY`` shows them);
* a **warning** (one class in the data, float16 on a CPU, an input outside the trained
  range...) is one line, ``PROG: warning: ...``;
* ``KeyboardInterrupt`` is ``PROG: interrupted`` with exit code 130;
* anything else is a bug and shows its traceback, as does every failure with
  ``COOPNETS_TRACEBACK=1``.

Example:
    >>> import contextlib, io
    >>> def main(depth):
    ...     raise bad_value("--depth", depth, "valid depths are 1..4")
    >>> err = io.StringIO()
    >>> with contextlib.redirect_stderr(err):
    ...     code = run_entry(main, 9, prog="demo")
    >>> code, err.getvalue()
    (2, 'demo: error: --depth 9: valid depths are 1..4\\n')
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import socket
import sys
import warnings
from typing import Any, Callable, Iterator, List, Optional

from ..hub.format import CheckpointError

#: what an entry point may raise for a bad request (one line, exit code 2); anything else is a bug
EXPECTED_ERRORS = (CheckpointError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                   IsADirectoryError, PermissionError, ImportError)
#: OSError numbers that are the machine's state, not a bug: disk full, read-only, quota
_EXPECTED_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)
#: HTTP client packages whose transport errors are network failures
_HTTP_PACKAGES = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3", "aiohttp")
_TRANSPORT_NAMES = ("TransportError", "NetworkError", "TimeoutException", "ConnectionError", "ProtocolError",
                    "ClientConnectionError", "NewConnectionError", "MaxRetryError")


def one_line(error: Any) -> str:
    """An error message on one line (newlines and runs of spaces folded).

    Example:
        >>> one_line(ValueError("bad depth 7;" + chr(10) + "  valid depths: 1..4"))
        'bad depth 7; valid depths: 1..4'
    """
    return " ".join(str(error).split()) or type(error).__name__


def bad_value(setting: str, value: Any, valid: str) -> ValueError:
    """The one sentence of a refused setting: ``SETTING VALUE: VALID`` (what is valid, or what to do).

    Example:
        >>> bad_value("--port", 0, "out of range: valid ports are 1..65535")
        ValueError('--port 0: out of range: valid ports are 1..65535')
    """
    return ValueError(f"{setting} {value}: {valid}")


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: List[int] = []
    while error is not None and id(error) not in seen:
        seen.append(id(error))
        yield error
        error = error.__cause__ if error.__cause__ is not None else (
            None if error.__suppress_context__ else error.__context__)


def _is_transport(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    package = type(error).__module__.split(".")[0]
    return package in _HTTP_PACKAGES and any(c.__name__ in _TRANSPORT_NAMES for c in type(error).__mro__)


def network_message(error: BaseException) -> Optional[str]:
    """One line for a network failure anywhere in ``error``'s chain (``None`` when there is none).

    Example:
        >>> network_message(ConnectionRefusedError(111, "Connection refused"))
        'a network request failed ([Errno 111] Connection refused): check the connection, or the address you gave'
    """
    failure = next((e for e in _chain(error) if _is_transport(e)), None)
    if failure is None:
        return None
    try:
        url = str(failure.request.url)  # httpx / requests errors know their request (httpx raises without one)
    except Exception:  # noqa: BLE001
        url = ""
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:  # pragma: no cover
        endpoint = "https://huggingface.co"
    if url.startswith(endpoint):
        return (f"the Hugging Face Hub at {endpoint} cannot be reached ({one_line(failure)}): check the connection "
                f"or HF_ENDPOINT, or work from the local cache with HF_HUB_OFFLINE=1")
    where = f" to {url}" if url else ""
    return f"a network request{where} failed ({one_line(failure)}): check the connection, or the address you gave"


def expected_message(error: BaseException) -> Optional[str]:
    """The one line an expected failure is reported as, or ``None`` for a bug (shown with its traceback)."""
    if isinstance(error, CheckpointError):  # coopnets' own sentence, network failures of downloads included
        return one_line(error)
    network = network_message(error)
    if network is not None:
        return network
    if isinstance(error, EXPECTED_ERRORS) or (isinstance(error, OSError) and error.errno in _EXPECTED_ERRNOS):
        return one_line(error)
    return None


def short_usage(parser: argparse.ArgumentParser) -> str:
    """One usage line: the program, ``[options]`` and its positional arguments.

    Example:
        >>> p = argparse.ArgumentParser(prog="coopnets export")
        >>> _ = p.add_argument("model", metavar="SOURCE"); _ = p.add_argument("--depth", type=int)
        >>> short_usage(p)
        'usage: coopnets export [options] SOURCE (coopnets export --help lists them)'
    """
    positionals = []
    for action in parser._actions:  # noqa: SLF001 - argparse keeps them only here
        if action.option_strings or action.help == argparse.SUPPRESS:
            continue
        metavar = action.metavar or action.dest
        positionals.append(" ".join(metavar) if isinstance(metavar, tuple) else str(metavar))
    return f"usage: {parser.prog} [options] {' '.join(positionals)} ({parser.prog} --help lists them)".replace("  ", " ")


def _short_error(self: argparse.ArgumentParser, message: str) -> None:
    self.exit(2, f"{short_usage(self)}\n{self.prog}: error: {one_line(message)}\n")


@contextlib.contextmanager
def policy(prog: Callable[[], str]) -> Iterator[None]:
    """The environment of an entry point: two-line argparse errors, one-line warnings, quiet Hub retries
    (``prog()`` names the program in warnings)."""
    error = argparse.ArgumentParser.error
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        print(f"{prog()}: warning: {one_line(message)}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        argparse.ArgumentParser.error = _short_error  # type: ignore[method-assign]
        if "HF_HUB_VERBOSITY" not in os.environ:
            hub_logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            argparse.ArgumentParser.error = error  # type: ignore[method-assign]
            hub_logger.setLevel(level)


def run_entry(main: Callable[..., Any], *args: Any, prog: str, name_of: Optional[Callable[[], str]] = None) -> int:
    """Run ``main(*args)`` under the policy (module docstring); returns the exit code, never raises ``SystemExit``.

    ``name_of``, when given, names the program in messages once ``main`` knows it (``coopnets train``).
    """
    name = name_of or (lambda: prog)
    with policy(name):
        try:
            return int(main(*args) or 0)
        except SystemExit as e:  # argparse (already printed), or sys.exit("message") of a script
            if e.code is None or isinstance(e.code, int):
                return int(e.code or 0)
            print(f"{name()}: error: {one_line(e.code)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{name()}: interrupted", file=sys.stderr)
            return 130
        except BaseException as e:  # noqa: BLE001 - sorted into expected failures and bugs
            message = expected_message(e)
            if message is None or os.environ.get("COOPNETS_TRACEBACK"):
                raise
            print(f"{name()}: error: {message}", file=sys.stderr)
            return 2
