"""Outputs kept in an S3-compatible object store: the bucket, the upload outbox the queue fills, the uploader."""
