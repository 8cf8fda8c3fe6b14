"""Read an offline W&B run back in the tests, without wandb's servers (wandb's own reader lives in its Go core)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Union


def read_offline_run(run_dir: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read back what an offline run recorded, without wandb's servers: ``{"history": [dict, ...],
    "summary": dict, "config": dict}`` with values decoded from JSON.

    The ``.wandb`` file is a sequence of protobuf records in LevelDB's log framing (32 KiB blocks, 7-byte
    record headers) after a 7-byte file header.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_dir).glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"no .wandb file in {run_dir}")
    data = files[0].read_bytes()
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        position += 7
        if length == 0 and kind == 0:
            break
        pending += data[position:position + length]
        position += length
        if kind in (1, 4):  # a full record, or the last fragment of one
            records.append(pending)
            pending = b""

    def key(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    history, summary, config = [], {}, {}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            config.update({key(i): json.loads(i.value_json) for i in updates if key(i) != "_wandb"})
    return {"history": history, "summary": summary, "config": config}
