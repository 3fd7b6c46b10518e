"""The project's one logging path: ``from sd.log import logger`` in every module.

It is paddlenlp's logger (what paddlenlp's Trainer itself logs through): one handler, one format,
``[time] [LEVEL] - message``, every level shown. It does not propagate to the root logger, so whatever
another library configures there (or leaves unconfigured) changes nothing: a line logged by the
dataset, the trainer or a tool always reaches stderr, in the same format. DataLoader worker processes
are forked with this logger and its handler, so the dataset's lines from inside a worker (shard
notices, pass summaries, skipped files) reach the same stderr.

Call it as ``logger.info(message)`` (one preformatted string; paddlenlp's logger takes no ``%`` arguments).
"""

import sys

from paddlenlp.utils.log import logger

__all__ = ["logger"]


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of writing.

    paddlenlp's handler keeps the ``sys.stderr`` of the moment paddlenlp was imported; when that was a
    temporary one (a test runner's capture, closed later), lines logged afterwards (e.g. a stream's
    summary when a loader shuts down at exit) would fail to write.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


logger.handler.setStream(_CurrentStderr())  # the one configuration: paddlenlp's handler and format, current stderr
