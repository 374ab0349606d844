"""Real data without a framework: class mappings and subsets, image sources and folder scanning, Stage I's
shape-bucketed images, pixel normalisation, and the embedded toy dataset."""
