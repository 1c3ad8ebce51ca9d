"""The child processes a lab tool runs, stopped with it: SIGTERM to the tool stops each running
child (and, with `own_group`, everything the child started, such as a notebook's kernel) and
starts no other, so nothing writes after the tool has exited."""

import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager

STOPPED = 128 + signal.SIGTERM  # the exit code of a child that never started: the tool was stopped


class Children:
    """`own_group`: each child in a process group of its own, stopped as a whole (a kernel with
    it); otherwise the child shares the tool's, so Ctrl-C in a terminal reaches it too."""

    def __init__(self, own_group=False):
        self.own_group = own_group
        self.running, self.stopping, self.lock = set(), False, threading.Lock()

    def run(self, cmd, timeout=None, **kwargs):
        """The child's exit code; past `timeout` seconds it is stopped and TimeoutExpired
        raised. Once the tool is stopping, no child starts."""
        with self.lock:
            if self.stopping:
                return STOPPED
            child = subprocess.Popen(cmd, start_new_session=self.own_group, **kwargs)
            self.running.add(child)
        try:
            return child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._stop(child)
            raise
        finally:
            with self.lock:
                self.running.discard(child)

    def _stop(self, child):
        try:
            if self.own_group:
                os.killpg(child.pid, signal.SIGTERM)
            else:
                child.terminate()
        except ProcessLookupError:
            pass
        child.wait()

    def stop(self, signum, frame):
        with self.lock:
            self.stopping = True
            children = list(self.running)
        for child in children:
            self._stop(child)
        sys.exit(128 + signum)

    @contextmanager
    def stopped_by_sigterm(self):
        """A context in which SIGTERM stops the children first (main thread only)."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self.stop) if main else None
        try:
            yield
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
