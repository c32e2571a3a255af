"""Models as Pyro programs: the VAE (``vae``, one model/guide pair with an optional mask and label), the mixture
baseline (``gmm``), M2 and its classifier (``m2``), the stage-2 VAE of the two-stage sampler (``two_stage``), and
the masked VAE with its masks (``masked``)."""
