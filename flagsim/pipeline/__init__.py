"""The Ray Data embedding pipeline: reader (decode) -> mapper (model actors) -> writer (shards)."""
