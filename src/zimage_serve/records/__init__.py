"""What Comfy API v2 keeps beside the queue: idempotency keys and asset records (`contract.Records`), in one
machine's SQLite file (`sqlite_records`) or a cluster's Redis (`redis_records`), peers behind one contract
(`tests/test_records_contract.py`); the assets' bytes are files in their owner's folders (`blobs`)."""
