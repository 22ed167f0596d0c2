"""Records, shards, ingestion, synthetic scenes and the Grain input pipeline."""
