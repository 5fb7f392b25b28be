"""Communication-efficient updates: codecs that encode what a client sends, and the round stage around them."""
