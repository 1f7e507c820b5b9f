"""Writes a `din prepare` TSV as Parquet with pyarrow: every column as read by
pyarrow.csv, the history columns (ids joined by ",") turned into list<int64>
columns, snappy compression (pyarrow's default), row groups of --row-group rows.

    python bench/parquet.py IN.tsv OUT.parquet [--row-group 65536]
"""
import argparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv
import pyarrow.parquet as pq

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("tsv")
ap.add_argument("out")
ap.add_argument("--row-group", type=int, default=65536)
args = ap.parse_args()
table = csv.read_csv(args.tsv, parse_options=csv.ParseOptions(delimiter="\t"),
                     convert_options=csv.ConvertOptions(strings_can_be_null=False))
for i, name in enumerate(table.column_names):
    if name.startswith("hist_"):
        col = table.column(name).cast(pa.string())
        lists = pc.split_pattern(col, ",").combine_chunks()  # an empty history gives [""]
        ids = pc.if_else(pc.equal(lists.flatten(), ""), "0", lists.flatten()).cast(pa.int64())  # 0: padding
        table = table.set_column(i, name, pa.ListArray.from_arrays(lists.offsets, ids))
pq.write_table(table, args.out, row_group_size=args.row_group)
print(f"wrote {args.out}: {table.num_rows} rows, schema {table.schema}".replace("\n", "; "))
