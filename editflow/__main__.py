"""``python -m editflow`` and the ``editflow`` command.

Ctrl-C while the command line itself is still being imported ends the same way as later
(one line, exit 130), not with a traceback from the middle of an import.
"""

import os
import signal
import sys


def entry() -> None:
    """Import the command line and run it (:func:`editflow.cli.entry`)."""
    try:
        from editflow.cli import entry as run_command_line
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("interrupted", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)
    run_command_line()


if __name__ == "__main__":
    entry()
