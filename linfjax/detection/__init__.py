"""Looking inside a model: activation norms, Grad-CAM, Neural Cleanse, outliers."""
