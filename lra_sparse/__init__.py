"""lra_sparse: Long Range Arena Transformers with pluggable dynamic sparse attention."""
