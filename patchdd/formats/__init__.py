"""File formats: the score store, the in-memory synthetic set and the exported synthetic folder."""
