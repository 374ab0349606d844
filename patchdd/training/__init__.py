"""Training pieces: the model zoo, on-device augmentation and mixing, the KD loss and RDED's protocol rules,
optimisers and metrics."""
