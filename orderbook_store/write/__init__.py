"""The write path: buffer, group-commit COPY, failure classes, durable spool, dead letters.

``writer`` is what ``OrderbookRepository.add`` feeds; ``failures`` decides what a failed write
means; ``spool`` keeps batches the database has not taken; ``dead_letters`` keeps rows it
refused.
"""
