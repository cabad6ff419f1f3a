"""The read path: time ranges in, columnar frames out (pandas, polars, Arrow, numpy).

``reader`` turns a read request into COPY-out SQL and decoded columns; ``features`` adds the
usual derived columns (mid, spread, microprice, imbalance) to a frame.
"""
