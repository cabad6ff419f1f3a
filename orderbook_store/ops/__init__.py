"""Operating the store: migrations, partitions, least-privilege roles and the doctor's checks."""
