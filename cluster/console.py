"""What a job shows on its console: one progress bar per long phase, one line per event, and Ray's
own output kept in Ray's log files (cluster/ray_session.py routes it; `configure(verbose=True)`
restores it).

    configure(verbose=args.verbose)                  # once, from a job's main (--verbose)
    bar = Progress("[grpo] step", total=20)          # a long phase
    bar.update(3, "reward 0.41  kept 8/8")           # position (absolute) and the phase's fields
    bar.close()
    write("[train] resumed from step 10")            # a line that does not tear an open bar

Where the output goes decides the form (`Progress`):
  - a terminal: a tqdm bar with rate and ETA, the fields as its postfix, redrawn at most every
    MININTERVAL_S;
  - anything else (a file, CI, `ray job submit` logs, a notebook): a plain line when the phase
    crosses each tenth of its total (LINE_FRACTION), at its end, and after MAX_SILENCE_S without
    a line, each with the elapsed time and the ETA; about ten lines per phase, whatever its length;
  - --verbose: a plain line per update (the jobs' output before the bars), next to Ray's own output.

`follow_metrics` moves a bar from a trainer's metrics.jsonl (the SFT/CPT workers write it; the
driver only waits); `phase` shows the elapsed time of a phase of unknown length (terminal only).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from typing import Callable, Iterator, TextIO

MININTERVAL_S = 0.5       # a bar is redrawn at most this often
LINE_FRACTION = 0.1       # off a terminal: a line at every tenth of a phase
MAX_SILENCE_S = 300.0     # ... and at least one every 5 minutes while it moves
POLL_S = 0.5              # follow_metrics: how often metrics.jsonl is read

_verbose = False
_stream: TextIO | None = None   # None: sys.stdout at the time of writing (pytest swaps it)
_open: dict[str, "Progress"] = {}


def configure(verbose: bool = False, stream: TextIO | None = None) -> None:
    """verbose: Ray's full output and plain lines (no bars); stream: where the console writes
    (default: sys.stdout)."""
    global _verbose, _stream
    _verbose, _stream = bool(verbose), stream


def verbose() -> bool:
    return _verbose


def out() -> TextIO:
    return _stream if _stream is not None else sys.stdout


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - transformers and huggingface_hub bring it
        return None
    return tqdm


def is_terminal(stream: TextIO | None = None) -> bool:
    s = stream if stream is not None else out()
    try:
        return bool(s.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bars_on(stream: TextIO | None = None) -> bool:
    """Bars (rather than lines): a terminal, not --verbose, tqdm importable."""
    return not _verbose and is_terminal(stream) and _tqdm() is not None


def _width(stream: TextIO) -> dict:
    """tqdm's size arguments: follow the terminal's size, or a fixed one where the terminal
    reports none (a pseudo-terminal of 0x0, under `script` or some CI runners: tqdm would then
    draw nothing, taking 0 rows as no room for a bar)."""
    try:
        size = os.get_terminal_size(stream.fileno())
        if size.columns > 0 and size.lines > 0:
            return {"dynamic_ncols": True}
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        pass
    cols, rows = shutil.get_terminal_size((100, 24))
    return {"ncols": cols, "nrows": rows}


def write(line: str, stream: TextIO | None = None) -> None:
    """One line on the console; an open bar is cleared first and drawn again below it."""
    s = stream if stream is not None else out()
    tqdm = _tqdm()
    if tqdm is not None and getattr(tqdm, "_instances", None):
        tqdm.write(line, file=s)
        s.flush()
    else:
        print(line, file=s, flush=True)


def hms(seconds: float) -> str:
    """1:05, 12:00, 1:02:03."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """One phase's progress: a bar on a terminal, plain lines elsewhere (see the module docstring).

    desc: what comes before the count ("[grpo] step"); total: the phase's length (None: unknown);
    initial: where it starts (a resumed run); unit: tqdm's unit; lines: print plain lines off a
    terminal (False: the phase ends in a line of its own, so none is needed); stream: default out();
    leave: keep the finished bar on the terminal; clock: seconds (tests pass a fake one);
    started: the clock's time the phase began, when before now (its rate counts from there;
    otherwise from the first update, so that a start-up, e.g. workers starting, is not a step).
    """

    def __init__(self, desc: str, total: int | None, *, initial: int = 0, unit: str = "step",
                 lines: bool = True, leave: bool = True, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, started: float | None = None):
        self.desc, self.total, self.n = desc, total, initial
        self.stream = stream if stream is not None else out()
        self.clock = clock
        self.t0, self.n0 = (clock() if started is None else started), initial
        # (time, position) the rate counts from
        self.first: tuple[float, int] | None = None if started is None else (started, initial)
        self.bar = None
        if bars_on(self.stream):
            self.bar = _tqdm()(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                               mininterval=MININTERVAL_S, leave=leave, **_width(self.stream))
            if started is not None:  # tqdm's elapsed time, from the phase's start
                self.bar.start_t -= max(0.0, clock() - started)
        self.lines = lines and self.bar is None
        # off a terminal: a line at each multiple of `every` (verbose: every update)
        self.every = 1 if _verbose else max(1, math.ceil((total or 0) * LINE_FRACTION))
        self.next_mark = (initial // self.every + 1) * self.every
        self.last_line_t, self.printed_n, self.fields = self.t0, initial, ""
        self.closed = False

    def eta_s(self) -> float:
        """Seconds left at the rate since the first update (the phase's start-up, e.g. workers
        starting, is not a step)."""
        if self.first is None or not self.total:
            return float("nan")
        done, dt = self.n - self.first[1], self.clock() - self.first[0]
        if done <= 0 or dt <= 0:
            return float("nan")
        return (self.total - self.n) * dt / done

    def line(self, fields: str = "") -> str:
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        when = f"{hms(self.clock() - self.t0)} elapsed"
        eta = self.eta_s()
        if self.total and self.n < self.total and math.isfinite(eta):
            when += f", ETA {hms(eta)}"
        return f"{self.desc} {count}" + (f"  {fields}" if fields else "") + f"  [{when}]"

    def _line_due(self, n: int) -> bool:
        if self.total and n >= self.total:
            return True
        return n >= self.next_mark or self.clock() - self.last_line_t >= MAX_SILENCE_S

    def update(self, n: int, fields: str = "") -> None:
        """Move to position `n` (absolute; a smaller one rewinds, e.g. a restarted worker group)."""
        if self.closed:
            return
        if self.first is None:
            self.first = (self.clock(), n)
        if self.bar is not None:
            if fields:
                self.bar.set_postfix_str(fields, refresh=False)
            if n >= self.bar.n:
                self.bar.update(n - self.bar.n)
            else:
                self.bar.n = n
                self.bar.refresh()
        elif self.lines and n != self.n and self._line_due(n):
            self.n = n
            self._print_line(fields)
        self.n, self.fields = n, fields

    def _print_line(self, fields: str) -> None:
        write(self.line(fields), self.stream)
        self.last_line_t, self.printed_n = self.clock(), self.n
        self.next_mark = (self.n // self.every + 1) * self.every

    def close(self) -> None:
        """The end of the phase; off a terminal, a last line where it stopped short of a line of its
        own (early stopping, an error)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.lines and self.n != self.printed_n and self.n > self.n0:
            self._print_line(self.fields)
        for key in [k for k, v in _open.items() if v is self]:
            del _open[key]


def progress(key: str, desc: str, total: int, *, initial: int = 0, **kw) -> Progress:
    """The open Progress registered under `key`, else a new one (for loops that print one step at
    a time through a stateless function, e.g. jobs.grpo.print_step)."""
    p = _open.get(key)
    if p is None or p.closed or p.total != total:
        p = _open[key] = Progress(desc, total, initial=initial, **kw)
    return p


def close_all() -> None:
    """Close every open bar (before an error line, which would otherwise follow a bar on its line)."""
    tqdm = _tqdm()
    for p in list(_open.values()):
        p.close()
    for bar in list(getattr(tqdm, "_instances", ()) if tqdm is not None else ()):
        with contextlib.suppress(Exception):
            bar.close()


@contextlib.contextmanager
def phase(desc: str, stream: TextIO | None = None) -> Iterator[None]:
    """The elapsed time of a phase of unknown length, on a terminal (cleared when it ends);
    nothing elsewhere (the phase's result line says how long it took)."""
    s = stream if stream is not None else out()
    if not bars_on(s):
        yield
        return
    bar = _tqdm()(total=None, desc=desc, bar_format="{desc} {elapsed}", file=s, leave=False, **_width(s))
    stop = threading.Event()

    def tick():
        while not stop.wait(1.0):
            bar.refresh()

    t = threading.Thread(target=tick, name="console-phase", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        bar.close()


# ---------------------------------------------------------------------------------- metrics.jsonl

class MetricsTail:
    """The records a trainer appends to a metrics.jsonl, read as they arrive. A rewritten file (a
    resume truncates it with os.replace) or a shorter one is read again from its top; a partly
    written last line waits for its newline; a line that does not parse is skipped.
    from_end: skip what the file holds now (an earlier attempt's records)."""

    def __init__(self, path: str, from_end: bool = True):
        self.path, self.offset, self.ident, self.tail = path, 0, None, b""
        if from_end:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                self.offset, self.ident = st.st_size, (st.st_dev, st.st_ino)

    def poll(self) -> list[dict]:
        try:
            st = os.stat(self.path)
        except OSError:
            return []
        ident = (st.st_dev, st.st_ino)
        if ident != self.ident or st.st_size < self.offset:
            self.offset, self.ident, self.tail = 0, ident, b""
        if st.st_size == self.offset:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        *complete, self.tail = (self.tail + data).split(b"\n")
        records = []
        for raw in complete:
            try:
                r = json.loads(raw)
            except ValueError:
                continue
            if isinstance(r, dict):
                records.append(r)
        return records


@contextlib.contextmanager
def follow_metrics(path: str, bar: Progress, fields: Callable[[dict, dict], str],
                   poll_s: float = POLL_S) -> Iterator[MetricsTail]:
    """While the body runs, a thread moves `bar` to the step of the newest record of `path` (a
    metrics.jsonl), with `fields(record, seen)` as its fields; `seen` keeps the latest value of
    every key (eval_loss comes with some steps only). The bar is closed at the end."""
    tail = MetricsTail(path)
    seen: dict = {}
    stop = threading.Event()

    def step() -> None:
        records = tail.poll()
        if not records:
            return
        for r in records:
            seen.update(r)
        last = records[-1]
        if isinstance(last.get("step"), (int, float)):
            bar.update(int(last["step"]), fields(last, seen))

    def loop() -> None:
        while not stop.wait(poll_s):
            try:
                step()
            except Exception:  # noqa: BLE001 - a console must never end a run
                pass

    t = threading.Thread(target=loop, name="console-metrics", daemon=True)
    t.start()
    try:
        yield tail
    finally:
        stop.set()
        t.join()
        with contextlib.suppress(Exception):
            step()
        bar.close()


# ---------------------------------------------------------------------------------- logging

class ConsoleHandler(logging.Handler):
    """Log records as lines on stderr (as logging's default handler) that do not tear an open bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write(self.format(record), sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own policy
            self.handleError(record)


def setup_logging(verbose: bool | None = None) -> None:
    """The driver's logging, as a job's main sets it: --verbose: INFO with times, as before;
    otherwise warnings and errors of every logger (the project's INFO lines are in metrics and
    summaries), and no transformers 'Loading weights' bars. Like logging.basicConfig, a root logger
    that already has handlers (pytest, a notebook) is left as it is."""
    v = _verbose if verbose is None else verbose
    if v:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
