"""Cross-tokenizer alignment: byte tables per tokenizer pair and exact byte-offset chunks."""
