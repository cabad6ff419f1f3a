"""Files in and out: importers for the old collector's and the exchanges' formats, and Parquet
export."""
