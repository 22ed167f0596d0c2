"""Source readers that turn sensor files and TFDS splits into schema Records."""
