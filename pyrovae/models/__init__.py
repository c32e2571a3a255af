"""Models as Pyro programs: the VAE (``vae``, one model/guide pair with an optional mask and label), the mixture
baseline (``gmm``), M2 and its classifier (``m2``), the stage-2 VAE of the two-stage sampler (``two_stage``), the
masked VAE with its masks (``masked``), and the zoo, one module per family: β-VAE (``beta``), VampPrior
(``vampprior``), a normalising-flow guide (``flow``), two stochastic layers (``hierarchical``), enumerated
categorical latents (``discrete``), the conditional VAE (``conditional``), with their register (``zoo``)."""
