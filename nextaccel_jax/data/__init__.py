"""fastMRI brain data: reader, coil combination, masks, synthetic volumes, TFDS builder, loader."""
