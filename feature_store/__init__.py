"""Feature spec, lake (offline store) and vocabularies: the single source of column names."""
