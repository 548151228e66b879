#!/usr/bin/env python3
"""Decode and encode paystream events with fastavro, using only schemas/.

Proves that a consumer in another language needs nothing but the .avsc files:
it computes each schema's CRC-64-AVRO fingerprint itself, matches the
single-object header (C3 01 + 8-byte little-endian fingerprint), and decodes
the body.

  fastavro_interop.py decode SCHEMAS_DIR < hex-lines     -> JSON lines
  fastavro_interop.py encode SCHEMAS_DIR < JSON envelope -> one hex line
"""
import datetime
import glob
import io
import json
import os
import sys
import uuid

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

MAGIC = b"\xc3\x01"


def load_schemas(schemas_dir):
    """fingerprint (8 LE bytes) -> parsed schema, for every .avsc file."""
    by_fp = {}
    paths = glob.glob(os.path.join(schemas_dir, "*.avsc")) + glob.glob(
        os.path.join(schemas_dir, "history", "*.avsc")
    )
    for path in paths:
        with open(path, encoding="utf-8") as f:
            parsed = fastavro.parse_schema(json.load(f))
        fp_hex = fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
        by_fp[bytes.fromhex(fp_hex)] = parsed
    return by_fp


def plain(value):
    """fastavro's Python values -> JSON (uuid -> str, datetime -> micros)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime.datetime):
        delta = value - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    return value


def decode(schemas_dir):
    schemas = load_schemas(schemas_dir)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        data = bytes.fromhex(line)
        if data[:2] != MAGIC:
            raise SystemExit(f"not single-object encoded: {data[:2].hex()}")
        schema = schemas.get(data[2:10])
        if schema is None:
            raise SystemExit(f"unknown fingerprint {data[2:10].hex()}")
        record = fastavro.schemaless_reader(io.BytesIO(data[10:]), schema)
        print(json.dumps(plain(record), sort_keys=True))


def encode(schemas_dir):
    with open(os.path.join(schemas_dir, "envelope.avsc"), encoding="utf-8") as f:
        schema = fastavro.parse_schema(json.load(f))
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
    record = json.load(sys.stdin)
    record["occurred_at"] = datetime.datetime.fromtimestamp(
        record["occurred_at"] / 1_000_000, tz=datetime.timezone.utc
    )
    # fastavro names a union branch with a (name, value) tuple.
    record["payload"] = tuple(record["payload"])
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    print((MAGIC + fp + buf.getvalue()).hex())


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("decode", "encode"):
        raise SystemExit(__doc__)
    {"decode": decode, "encode": encode}[sys.argv[1]](sys.argv[2])
