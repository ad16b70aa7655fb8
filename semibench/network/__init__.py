"""The shared network every method trains: DenseUNet on a DenseNet encoder."""
