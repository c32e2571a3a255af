"""Neural-network pieces: encoder/decoder nets (``nets``) and the likelihoods p(x|z) they parameterise
(``likelihoods``)."""
