"""PostgreSQL's COPY, both ways: the one primitive the write, read, import and export paths use.

``copy_in`` encodes validated rows as COPY text for ``COPY ... FROM STDIN``; ``copy_out``
decodes ``COPY ... TO STDOUT`` text into numpy columns.
"""
