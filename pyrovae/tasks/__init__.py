"""Tasks on trained runs, as library functions with typed arguments (no command-line parsing): ``evaluate``,
``compare``, ``complete`` (masked training and completion), ``gap`` (inference gap), ``samples`` (two-stage and
latent-GMM samplers, MMD) and ``semisupervised`` (M2). Each command in ``cli/`` calls one of them."""
