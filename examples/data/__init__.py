"""Data: datasets (BUSI, image/mask folders, the phantom) and the registry that names them, samples,
transforms, splits and duplicate detection."""
