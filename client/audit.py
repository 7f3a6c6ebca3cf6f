"""The site's audit log: one fsync'ed JSON line per decision and per outbound reply.

Written BEFORE the reply leaves the site, so the log never misses what was sent.

Hash chain. Every record carries ``seq`` (1, 2, ... along the chain) and ``prev``: the
SHA-256 of the previous record's line, its exact bytes without the newline
(:func:`line_hash`), or :data:`GENESIS` for the first record of a log. Editing,
inserting or deleting a line breaks the link of the record after it, which
:meth:`AuditLog.verify` (``medfed site audit --verify``) reports. The chain makes edits
evident, not impossible: whoever rewrites every line after an edit forges a consistent
tail, so ``verify`` prints the head hash for the operator to note elsewhere.

What is a record. A line is a record when it parses as a JSON object. Records written
before the chain (no ``prev``) still read; ``verify`` counts them as unchained legacy
records, and the first chained record links to the last of them.

Torn lines. A crash while appending can leave a last line without its newline. The
next append first ends it with a newline, so the fragment stays a line of its own and
is never glued onto the next record; if the fragment is not a record, an
``audit-torn-line`` record (its offset, size and hash) is written next. The chain skips
lines that are not records: ``prev`` always names the last line that is one.
``verify`` lists torn lines as warnings; they break nothing when the chain runs on
past them.

Appends take an exclusive ``flock`` on the log, so the worker thread and a command
line tool never interleave (and never chain two records to one predecessor).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: ``prev`` of the first record of a log.
GENESIS = "sha256:" + "0" * 64
TORN_EVENT = "audit-torn-line"
_BLOCK = 1 << 16


def arrays_digest(arrays: dict[str, np.ndarray]) -> tuple[str, int]:
    """SHA-256 over names and bytes of ``arrays``, and their total size in bytes."""
    h = hashlib.sha256()
    size = 0
    for name in sorted(arrays):
        data = memoryview(np.ascontiguousarray(arrays[name])).cast("B")  # hashed in place
        h.update(name.encode())
        h.update(data)
        size += data.nbytes
    return "sha256:" + h.hexdigest(), size


def line_hash(line: bytes) -> str:
    """The chain's hash of one line: SHA-256 of its bytes, without the newline."""
    return "sha256:" + hashlib.sha256(line).hexdigest()


def parse_line(line: bytes) -> dict[str, Any] | None:
    """The record a line holds, or None when it is not one (a torn or edited line)."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _salvage(line: bytes) -> dict[str, Any] | None:
    """A whole record glued onto a torn fragment (logs written before the chain).

    The old writer appended after a torn last line without ending it first, so the
    next record shared its line. The record is the first suffix that parses.
    """
    start = line.find(b'{"', 1)
    while start > 0:
        record = parse_line(line[start:])
        if (
            record is not None and "event" in record and "time" in record and "prev" not in record
        ):  # only the old writer glued, and it did not chain
            return record
        start = line.find(b'{"', start + 1)
    return None


@dataclass(frozen=True)
class TornLine:
    """A line that is not a record."""

    line: int  # 1-based line number
    offset: int  # its first byte
    size: int
    #: False: the last line, still without its newline (the next append ends it).
    terminated: bool
    #: An ``audit-torn-line`` record right after it names it (the append noticed it).
    noted: bool = False
    #: A whole record found glued after the fragment (a log written before the chain).
    salvaged: bool = False


@dataclass(frozen=True)
class ChainBreak:
    """A record whose link does not match the line before it."""

    line: int
    expected: str
    found: str
    what: str


@dataclass(frozen=True)
class AuditVerification:
    """What :meth:`AuditLog.verify` found."""

    path: Path
    records: int = 0  # lines that are records
    chained: int = 0  # records with ``prev``
    legacy: int = 0  # records before the chain began (no ``prev``)
    torn: list[TornLine] = field(default_factory=list)
    breaks: list[ChainBreak] = field(default_factory=list)
    head: str = GENESIS  # hash of the last record's line: what the next record links to
    head_seq: int = 0

    @property
    def intact(self) -> bool:
        """True when every chained record links to the record before it."""
        return not self.breaks


@dataclass(frozen=True)
class _Tail:
    prev: str
    seq: int
    #: (offset, bytes) of an unterminated last line, None when the file ends with a newline.
    fragment: tuple[int, bytes] | None


def _lines_backward(fd: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of the lines in the file's first ``end`` bytes, last first.

    A newline at ``end - 1`` ends the last line (no empty line follows it); lines are
    yielded without their newline.
    """
    if end <= 0:
        return
    pos = end - 1 if os.pread(fd, 1, end - 1) == b"\n" else end
    buf = b""  # the bytes [pos, ...) not yet yielded
    while True:
        cut = buf.rfind(b"\n")
        if cut >= 0:
            yield pos + cut + 1, buf[cut + 1 :]
            buf = buf[:cut]
        elif pos > 0:
            start = max(0, pos - _BLOCK)
            buf = os.pread(fd, pos - start, start) + buf
            pos = start
        else:
            yield 0, buf
            return


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _dumps(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True).encode()


class AuditLog:
    """Append-only, hash-chained JSON-lines audit log of a site."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # (inode, size) after this object's last append -> (prev, seq): a cached tail
        self._tail_cache: tuple[tuple[int, int], str, int] | None = None

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one chained record and fsync it; returns the record."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes
            st = os.fstat(fd)
            tail = self._tail(fd, (st.st_ino, st.st_size))
            out, prev, seq = b"", tail.prev, tail.seq
            if tail.fragment is not None:  # a torn last line: end it, never glue onto it
                offset, fragment = tail.fragment
                out += b"\n"
                if parse_line(fragment) is not None:  # a whole record that lost its newline
                    prev, seq = line_hash(fragment), _seq(parse_line(fragment))
                else:
                    seq += 1
                    note = _dumps(
                        {
                            "time": _now(),
                            "event": TORN_EVENT,
                            "offset": offset,
                            "bytes": len(fragment),
                            "hash": line_hash(fragment),
                            "seq": seq,
                            "prev": prev,
                        }
                    )
                    out += note + b"\n"
                    prev = line_hash(note)
            entry = {"time": _now(), "event": event, **fields, "seq": seq + 1, "prev": prev}
            line = _dumps(entry)
            out += line + b"\n"
            view = memoryview(out)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            self._tail_cache = ((st.st_ino, st.st_size + len(out)), line_hash(line), seq + 1)
        finally:
            os.close(fd)
        return entry

    def _tail(self, fd: int, key: tuple[int, int]) -> _Tail:
        """The link and seq for the next record, and a torn last line if there is one."""
        if self._tail_cache is not None and self._tail_cache[0] == key:
            return _Tail(self._tail_cache[1], self._tail_cache[2], None)
        size = key[1]
        if size == 0:
            return _Tail(GENESIS, 0, None)
        fragment = None
        end = size
        if os.pread(fd, 1, size - 1) != b"\n":  # torn: the last line lost its newline
            fragment = next(_lines_backward(fd, size))
            end = fragment[0]
        for _, line in _lines_backward(fd, end):
            record = parse_line(line)
            if record is not None:
                return _Tail(line_hash(line), _seq(record), fragment)
        return _Tail(GENESIS, 0, fragment)

    def read(self) -> list[dict[str, Any]]:
        """All records, oldest first.

        Lines that are not records (torn by a crash, or edited) are skipped; a record
        glued onto a torn fragment by the writer of old logs is read back.
        """
        return self.read_from(0)[0]

    def read_from(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        """Records of the whole lines from byte ``offset`` on, and the offset after them."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            return [], offset
        end = data.rfind(b"\n") + 1  # an unterminated last line is read once it is ended
        out = []
        for line in data[:end].split(b"\n")[:-1]:
            record = parse_line(line)
            if record is None:
                record = _salvage(line)
            if record is not None:
                out.append(record)
        return out, offset + end

    def verify(self) -> AuditVerification:
        """Check the chain, line by line; torn lines are reported, not counted as breaks."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return AuditVerification(self.path)
        lines = data.split(b"\n")
        unterminated = lines.pop()  # b"" when the file ends with a newline
        records = chained = legacy = 0
        torn: list[TornLine] = []
        breaks: list[ChainBreak] = []
        prev, seq, offset = GENESIS, 0, 0
        pending: list[tuple[int, int, bytes]] = []  # torn lines not yet known to be noted
        for number, line in enumerate([*lines, unterminated] if unterminated else lines, 1):
            at, offset = offset, offset + len(line) + 1
            record = parse_line(line)
            if record is None:
                pending.append((number, at, line))
                continue
            noted = (
                record.get("event") == TORN_EVENT
                and len(pending) == 1
                and record.get("hash") == line_hash(pending[0][2])
            )
            torn += [
                TornLine(n, o, len(b), True, noted, _salvage(b) is not None) for n, o, b in pending
            ]
            pending = []
            records += 1
            if "prev" not in record:
                if chained:
                    breaks.append(
                        ChainBreak(
                            number, prev, "(none)", "a record without a link after the chain began"
                        )
                    )
                else:
                    legacy += 1
            else:
                chained += 1
                if record["prev"] != prev:
                    breaks.append(
                        ChainBreak(
                            number,
                            prev,
                            str(record["prev"]),
                            "its link does not match the record before it (a line before it "
                            "was edited, inserted or deleted)",
                        )
                    )
                elif _seq(record) != seq + 1:
                    breaks.append(
                        ChainBreak(
                            number,
                            f"seq {seq + 1}",
                            f"seq {record.get('seq')}",
                            "its sequence number does not follow",
                        )
                    )
            prev, seq = line_hash(line), _seq(record)
        for n, o, b in pending:
            last = bool(unterminated) and n == len(lines) + 1
            torn.append(TornLine(n, o, len(b), not last, False, _salvage(b) is not None))
        return AuditVerification(self.path, records, chained, legacy, torn, breaks, prev, seq)


def _seq(record: dict[str, Any] | None) -> int:
    value = (record or {}).get("seq")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
