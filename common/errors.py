"""The project's error contract: one base error, and the exit code of every kind of failure.

Every named error of the project derives from :class:`IdcError` and carries the exit code a
command-line tool returns for it. :func:`common.cli_util.dispatch` is the one place that
turns an exception into one line on stderr and that code; nothing else prints tracebacks.

=====  ====================  ==================================================================
code   name                  meaning
=====  ====================  ==================================================================
0      EXIT_OK               done
1      EXIT_CHECK_FAILED     the command ran and its answer is no (``audit verify`` found a bad
                             entry, ``audit cross-check`` a mismatch)
2      EXIT_BAD_INPUT        a flag, file or folder is wrong: usage errors (argparse), bad
                             values, missing, unreadable or malformed files, no usable data
3      EXIT_REFUSED          refused to protect integrity or privacy (fail closed): a model
                             whose weights do not match its record, a corrupt privacy ledger, an
                             audit log that cannot be written, a spent privacy budget
4      EXIT_FEDERATION       Flower or the federation failed: SuperLink unreachable, a process
                             died, a wait timed out, a run ended failed or stopped
70     EXIT_INTERNAL         a bug: the message says what broke; ``-v`` shows the traceback
130    EXIT_INTERRUPTED      stopped by Ctrl-C
=====  ====================  ==================================================================
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3
EXIT_FEDERATION = 4
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class IdcError(Exception):
    """Base of the project's named errors; the message names the input and what to do."""

    exit_code: ClassVar[int] = EXIT_BAD_INPUT


class RefusedError(IdcError):
    """Base of the fail-closed refusals (integrity, privacy, audit)."""

    exit_code: ClassVar[int] = EXIT_REFUSED


class FederationError(IdcError):
    """Base of the failures of Flower processes and runs."""

    exit_code: ClassVar[int] = EXIT_FEDERATION
