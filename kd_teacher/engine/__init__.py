"""Teacher mode: model building/loading, forward, vocab-parallel top-k, batching."""
