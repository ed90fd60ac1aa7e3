"""Training a classifier: the SGD step, fine-tuning on S, CA/ASR/RA."""
