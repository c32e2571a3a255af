"""Models as Pyro programs: the VAE (``vae``, one model/guide pair with optional mask and label) and the
mixture baseline (``gmm``)."""
