"""Writes a `din prepare` (or `din bench gen`) TSV as Parquet with pyarrow:
every column as read by pyarrow.csv, the history columns (ids joined by ",")
turned into list<int64> columns, snappy compression (pyarrow's default; see
--compression), row groups of --row-group rows. The TSV is read and written
block by block, so a file larger than memory converts too.

    python bench/parquet.py IN.tsv OUT.parquet [--row-group 65536] [--compression snappy] [--no-dictionary]
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
ap.add_argument("--compression", default="snappy", help="snappy, zstd, none, ...")
ap.add_argument("--no-dictionary", action="store_true",
                help="plain encoding: a file about as large as the data it holds")
args = ap.parse_args()


def converted(batch):
    table = pa.Table.from_batches([batch])
    for i, name in enumerate(table.column_names):
        if name.startswith("hist_"):
            col = table.column(name).cast(pa.string())
            lists = pc.split_pattern(col, ",").combine_chunks()  # an empty history gives [""]
            flat = lists.flatten()
            ids = pc.if_else(pc.equal(flat, ""), "0", flat).cast(pa.int64())  # 0: padding
            table = table.set_column(i, name, pa.ListArray.from_arrays(lists.offsets, ids))
    return table


reader = csv.open_csv(args.tsv, read_options=csv.ReadOptions(block_size=16 << 20),
                      parse_options=csv.ParseOptions(delimiter="\t"),
                      convert_options=csv.ConvertOptions(strings_can_be_null=False))
writer, rows, pending, held = None, 0, [], 0
for batch in reader:
    table = converted(batch)
    if writer is None:
        schema = table.schema
        writer = pq.ParquetWriter(args.out, schema, compression=args.compression,
                                  use_dictionary=not args.no_dictionary)
    pending.append(table.cast(schema))
    held += table.num_rows
    # Whole row groups of --row-group rows, whatever the CSV blocks hold.
    while held >= args.row_group:
        t = pa.concat_tables(pending)
        writer.write_table(t.slice(0, args.row_group), row_group_size=args.row_group)
        rest = t.slice(args.row_group)
        pending, held = [rest], rest.num_rows
    rows += table.num_rows
if held:
    writer.write_table(pa.concat_tables(pending), row_group_size=args.row_group)
writer.close()
print(f"wrote {args.out}: {rows} rows, schema {schema}".replace("\n", "; "))
