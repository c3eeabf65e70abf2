"""The KVCOMM method: templates and segments, anchor pools, matching, the reuse path, strategies, the engine."""
