"""Stage II: every method that makes a synthetic set (one file each, one registry), the clustering and
selection of the paper, composition of patches into images, and building sets from a score store."""
