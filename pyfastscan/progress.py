"""Progress of long work on stderr: done / total, rate and ETA; one line rewritten in place
on a terminal, on a pipe or log file a new line every 10 s (and at the end)."""
import sys
import time


class Progress:
    """``update(done)`` after each item; ``unit`` names the items ("ROIs", "slides")."""

    def __init__(self, total: int, label: str, enabled: bool = True, unit: str = "items"):
        self.total, self.label, self.unit = total, label, unit
        self.enabled = enabled and total > 0
        self.tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last = 0.0

    def update(self, done: int, note: str = "") -> None:
        """``note`` is added to the line (e.g. "1 failed")."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < self.total and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        line = f"{self.label}: {done}/{self.total} {self.unit}, {rate:.2f} {self.unit.rstrip('s')}/s, ETA {eta:.0f} s"
        line += f", {note}" if note else ""
        if self.tty:
            sys.stderr.write(f"\r{line}   " + ("\n" if done >= self.total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
