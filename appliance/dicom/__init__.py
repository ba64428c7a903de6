"""DICOM encoding: the structural walk, attribute extraction, transcoding, 3D volumes, dose grids."""
