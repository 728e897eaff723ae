"""Serving many generations on one model: KV slots and ragged passes (slots), one generation's decode
state (decode), speculative drafting and verification (speculative), the continuous-batching
scheduler (batcher) and multi-turn chat sessions (chat). The HTTP front end is the CLI engine.serve."""
