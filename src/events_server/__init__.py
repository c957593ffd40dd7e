"""Event ingestion gRPC server: validate, deduplicate, queue on Redis Streams."""
