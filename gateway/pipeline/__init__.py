"""The ingest pipeline: decode → validate → enrich → route, in batches between bounded queues."""
