"""Reports in one place: markdown tables and numbers (``markdown``), figures (``figures``), ArviZ and netCDF
(``inference_data``), and the TensorBoard callback (``tensorboard``)."""
