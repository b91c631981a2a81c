"""Reads a `db-writer export --format parquet` file with pyarrow and prints, as one JSON
document, what a data team would look at: the schema as pyarrow sees it, the row count, the
rows, and pyarrow's own printout of the schema and the first rows."""

import json
import sys

import pyarrow.parquet as pq

table = pq.read_table(sys.argv[1])
print(
    json.dumps(
        {
            "schema": [[f.name, str(f.type), f.nullable] for f in table.schema],
            "num_rows": table.num_rows,
            "rows": table.to_pylist(),
            "printed": str(table.schema) + "\n" + str(table.slice(0, 3).to_pydict()),
        }
    )
)
