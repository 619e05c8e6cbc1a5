"""Stopping a run cleanly: the first Ctrl-C or SIGTERM (what schedulers and ``timeout`` send
before killing) asks the trainer to finish the current step, save and stop; a second one
stops at once (``KeyboardInterrupt``), and the trainer saves the last completed step."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator


class StopSignals:
    """Records a stop request (:attr:`requested`, the signal's :attr:`name`) while
    :meth:`watching`; the request stays set once made."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.name: str | None = None  # 'SIGINT' or 'SIGTERM'

    @contextlib.contextmanager
    def watching(self, announce: Callable[[str], None]) -> Iterator[None]:
        """Install the handlers (main thread only; elsewhere Python delivers no signals) and
        put the previous ones back at the end. ``announce`` writes the line a first signal
        prints."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in self.SIGNALS}

        def handler(signum, frame):
            if self.requested:  # a second signal: stop now
                raise KeyboardInterrupt
            self.requested = True
            self.name = signal.Signals(signum).name
            announce(f"{self.name}: finishing this step, then saving a checkpoint (send it again to stop at once)")

        for s in self.SIGNALS:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s in self.SIGNALS:
                signal.signal(s, previous[s])
