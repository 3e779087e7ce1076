"""Reads a wandb `.wandb` run file back, with wandb's own protobuf classes (no reader ships with wandb).

Format (see shared/notes/platform-facts.md): 7-byte header, then 32 KiB blocks of chunks, each
crc32 (uint32 LE) | length (uint16 LE) | type (uint8) | data; type 1 is a whole record, 2/3/4 the first,
middle and last piece of a record split across blocks.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[: len(HEADER)] == HEADER, f"{path} is not a .wandb file"
    records, pending, position = [], b"", len(HEADER)
    while position + CHUNK_HEADER <= len(data):
        block_left = BLOCK - (position % BLOCK)
        if block_left < CHUNK_HEADER:
            position += block_left  # zero padding at a block's tail
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + CHUNK_HEADER])
        if checksum == 0 and length == 0 and kind == 0:
            break
        payload = data[position + CHUNK_HEADER : position + CHUNK_HEADER + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == checksum, "corrupt chunk"
        position += CHUNK_HEADER + length
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


@dataclass
class RunReadBack:
    history: list[dict] = field(default_factory=list)  # one dict per history record, with "_step"
    config: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    record_types: set = field(default_factory=set)

    def values(self, key: str) -> list[tuple[int, float]]:
        return [(row["_step"], row[key]) for row in self.history if key in row]

    def keys(self) -> set[str]:
        return {key for row in self.history for key in row}


def read_run(run_file: Path, wait_s: float = 30.0) -> RunReadBack:
    """The run as written. wandb-core (a separate process) may still be flushing the file for a moment after
    `run.finish()` returns, so wait until the run's exit record is there."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            result = _decode_run(run_file)
        except (AssertionError, struct.error):  # a chunk caught half-written
            if time.monotonic() > deadline:
                raise
        else:
            if "exit" in result.record_types or time.monotonic() > deadline:
                return result
        time.sleep(0.2)


def _decode_run(run_file: Path) -> RunReadBack:
    result = RunReadBack()
    for record in read_records(run_file):
        kind = record.WhichOneof("record_type")
        result.record_types.add(kind)
        if kind == "history":
            row = {}
            for item in record.history.item:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                row[key] = json.loads(item.value_json)
            row.setdefault("_step", record.history.step.num)
            result.history.append(row)
        elif kind == "config":
            for item in record.config.update:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                result.config[key] = json.loads(item.value_json)
        elif kind == "run":
            result.run = {"name": record.run.display_name, "group": record.run.run_group, "project": record.run.project,
                          "host": record.run.host}
            for item in record.run.config.update:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                result.config[key] = json.loads(item.value_json)
    return result


def find_run_files(wandb_root: Path) -> list[Path]:
    return sorted(wandb_root.glob("wandb/*run-*/run-*.wandb"), key=lambda path: path.stat().st_mtime)
