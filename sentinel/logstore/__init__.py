"""Log stores (local SQLite-backed JSON store; Elasticsearch) and the shipper that feeds them."""
