"""Decode breakwater's RowBinary with the current ClickHouse engine (chdb-core).

Usage: decode_rowbinary.py DDL_FILE ROWBINARY_FILE STRUCTURE
Creates the table from breakwater's modern DDL (proving the DDL is valid on the
current engine), inserts the RowBinary file through it, and prints the rows as
JSONEachRow on stdout.
"""
import sys

from chdb import session

ddl_path, data_path, structure = sys.argv[1], sys.argv[2], sys.argv[3]
with open(ddl_path) as f:
    ddl = f.read()

s = session.Session()
s.query("CREATE DATABASE IF NOT EXISTS bw")
s.query(ddl)
quoted = structure.replace("\\", "\\\\").replace("'", "\\'")
s.query(f"INSERT INTO bw.events SELECT * FROM file('{data_path}', RowBinary, '{quoted}')")
result = s.query(
    "SELECT message_id, source_name, toTypeName(source_name) AS source_type, type, event, user_id, anonymous_id, "
    "toUnixTimestamp64Milli(timestamp) AS timestamp_ms, toUnixTimestamp64Milli(received_at) AS received_at_ms, payload "
    "FROM bw.events ORDER BY message_id",
    "JSONEachRow",
)
sys.stdout.write(result.bytes().decode())
