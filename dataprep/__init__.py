"""Data preparation: the offline corpus, tokenizers, register banks, the cross-tokenizer view of a masked
canvas, and App. H's prompt/answer pairs."""
