"""Data stage: archives to prepared samples (``obtain``, ``prepared``), splits and tiles, and
the tensors and augmented views that training reads (``loading``, ``augment``)."""
