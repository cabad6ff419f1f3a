"""orderbook_store."""
