"""TensorBoard event files without TensorFlow, tensorboard or protobuf: a scalar writer and its reader.

A file is a sequence of TFRecords: ``uint64 length | uint32 masked crc32c(length) | data | uint32 masked
crc32c(data)`` (little-endian; mask = rotate right 15, + 0xa282ead8). Each record's data is an ``Event``
protobuf, of which we write four fields by hand:

    Event      { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
                 SessionLog session_log = 7; }
    Summary    { repeated Value value = 1; }    Value { string tag = 1; float simple_value = 2; }
    SessionLog { SessionStatus status = 1; }    (START = 1: TensorBoard drops older events past this step)

The first event of a file is ``file_version = "brain.Event:2"``, which tells readers to honour SessionLog START;
a resumed run writes one at the first step it logs again (checkpoint step + 1), so the steps a crashed
invocation logged past its checkpoint disappear.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

FILE_VERSION = "brain.Event:2"
SESSION_START = 1
_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli polynomial, reflected
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord uses (not zlib's CRC-32)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# --- protobuf wire format: varints, tags, length-delimited fields --------------------------------------------------
def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 negatives are ten-byte two's complement
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, scalars: dict[str, float] | None = None,
                 file_version: str | None = None, session_start: bool = False) -> bytes:
    """One serialized ``Event``: a file version, a SessionLog START, or a summary of scalar values."""
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value))
                          for tag, value in scalars.items())
        out += _bytes_field(5, values)
    if session_start:
        out += _bytes_field(7, _field(1, 0) + _varint(SESSION_START))
    return out


def frame(data: bytes) -> bytes:
    """One TFRecord around ``data``."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))


def file_name(folder: Path) -> str:
    """``events.out.tfevents.<seconds>.<host>.<pid>``, the seconds bumped past any file already there: readers
    take a folder's files in name order, so a resumed run's file must sort after the earlier ones."""
    seconds = int(time.time())
    for old in folder.glob("events.out.tfevents.*"):
        stamp = old.name.split(".")[3]
        if stamp.isdigit():
            seconds = max(seconds, int(stamp) + 1)
    return f"events.out.tfevents.{seconds:010d}.{socket.gethostname()}.{os.getpid()}"


class EventWriter:
    """Appends scalar events to a new file in ``folder`` (flushed per step, like metrics.jsonl)."""

    def __init__(self, folder: str | Path, resume_step: int | None = None):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / file_name(folder)
        self._handle = self.path.open("ab")
        self._write(encode_event(time.time(), 0, file_version=FILE_VERSION))
        if resume_step is not None:
            self._write(encode_event(time.time(), resume_step + 1, session_start=True))

    def _write(self, event: bytes) -> None:
        self._handle.write(frame(event))
        self._handle.flush()

    def add_scalars(self, step: int, scalars: dict[str, float], wall_time: float | None = None) -> None:
        if scalars:
            self._write(encode_event(time.time() if wall_time is None else wall_time, step, scalars))

    def close(self) -> None:
        self._handle.close()


# --- reading (tests, and anyone without tensorboard) ---------------------------------------------------------------
def read_records(path: str | Path, torn_tail_ok: bool = False) -> list[bytes]:
    """The data of every TFRecord in ``path``; a bad checksum or a torn record names the file and offset.
    ``torn_tail_ok``: a last record cut short (the writer was killed mid-write) ends the file, as in TensorBoard."""
    raw, out, pos = Path(path).read_bytes(), [], 0
    while pos < len(raw):
        if len(raw) - pos < 12:
            if torn_tail_ok:
                break
            raise ValueError(f"{path}: torn record at byte {pos}")
        header = raw[pos:pos + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", raw[pos + 8:pos + 12])
        if header_crc != masked_crc(header):
            raise ValueError(f"{path}: bad record header checksum at byte {pos}")
        if pos + 16 + length > len(raw):
            if torn_tail_ok:
                break
            raise ValueError(f"{path}: torn record at byte {pos}")
        data = raw[pos + 12:pos + 12 + length]
        (data_crc,) = struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])
        if data_crc != masked_crc(data):
            raise ValueError(f"{path}: data checksum mismatch in the record at byte {pos}")
        out.append(data)
        pos += 16 + length
    return out


def _fields(data: bytes) -> list[tuple[int, Any]]:
    """(field number, value) pairs of one protobuf message: ints, 8/4-byte raw values, or nested bytes."""
    out, pos = [], 0

    def varint() -> int:
        nonlocal pos
        value, shift = 0, 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, varint()))
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            out.append((number, data[pos:pos + size]))
            pos += size
        elif wire == 2:
            size = varint()
            out.append((number, data[pos:pos + size]))
            pos += size
        else:
            raise ValueError(f"protobuf wire type {wire} is not used by scalar events")
    return out


def decode_event(data: bytes) -> dict[str, Any]:
    """An Event as ``{"wall_time", "step", "file_version"?, "scalars"?, "session_start"?}``."""
    event: dict[str, Any] = {"step": 0}
    for number, value in _fields(data):
        if number == 1:
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif number == 2:
            event["step"] = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 3:
            event["file_version"] = value.decode()
        elif number == 5:
            scalars = event.setdefault("scalars", {})
            for _, item in _fields(value):
                parts = dict(_fields(item))
                scalars[parts[1].decode()] = struct.unpack("<f", parts[2])[0]
        elif number == 7:
            event["session_start"] = dict(_fields(value)).get(1) == SESSION_START
    return event


def read_scalars(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] over every event file of ``folder`` in name order; a SessionLog START at step s
    drops the values logged earlier at steps >= s, and a torn last record is ignored, as TensorBoard's
    EventAccumulator does."""
    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        for data in read_records(path, torn_tail_ok=True):
            event = decode_event(data)
            if event.get("session_start"):
                series = {tag: [(s, v) for s, v in points if s < event["step"]] for tag, points in series.items()}
            for tag, value in event.get("scalars", {}).items():
                series.setdefault(tag, []).append((event["step"], value))
    return series
