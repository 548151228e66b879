"""Reads an Avro object container file with fastavro (an independent Avro
implementation) and prints its header facts, then one JSON object per record."""
import json
import sys

import fastavro

with open(sys.argv[1], "rb") as f:
    reader = fastavro.reader(f)
    meta = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in reader.metadata.items()}
    print(json.dumps({"codec": meta.get("avro.codec"), "schema_name": reader.writer_schema.get("name")}))
    for rec in reader:
        print(json.dumps(rec, default=str, sort_keys=True))
