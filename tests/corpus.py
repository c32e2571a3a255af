"""A conformance corpus: small model/guide pairs written in the idioms of Pyro's examples and of Pyro's own
model/guide validity tests (plates with and without a size, subsampling, nested and reused plates, modules in
the model or the guide, masks, factors, enumeration, global latents, keyword data, closed-over data, ...).

Each :class:`Case` builds its programs with deterministic initial values (so that two builds train alike),
makes its data, and says which of pyrovae's estimators must refuse it (and with what message). A case built
with ``full=N`` opens its data plate as a plate of size N subsampled at the batch's datapoints: the program that
Pyro itself scales, the reference for pyrovae's minibatch scale.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.infer import config_enumerate
from torch import nn

from pyrovae.data import Call

D, Z = 3, 2  # data and latent dims of every case


def _net(*sizes: int, seed: int) -> nn.Module:
    """A small MLP initialised from its own seed (the global RNG is left alone)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        return nn.Sequential(*layers[:-1])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Case:
    """One program of the corpus: ``model``/``guide``, its data, and what pyrovae must do with it."""

    idiom = ""
    n = 6  # datapoints of the full-batch checks
    nesting = 1  # the program's max plate nesting
    data_dim = -1  # the data plate's dim
    local = True  # every latent site sits in the data plate: log p(x) is per datapoint
    scorable = ""  # regex of log_likelihood's one-line refusal of a local program ("" where it scores it)
    minibatch = True  # the case opens its data plate through ``self.plate`` and can be subsampled by Pyro
    refuse: dict[str, str] = {}  # estimator name -> regex of fit's one-line refusal (before any step)
    vectorizable = True  # the program broadcasts over a particle dim

    def __init__(self, full: int | None = None) -> None:
        self.full = full

    @property
    def name(self) -> str:
        return type(self).__name__

    # -- data
    def data(self, n: int, seed: int = 0) -> Call:
        """Positional and keyword data of ``n`` datapoints."""
        return Call((self.x(n, seed),), {})

    def x(self, n: int, seed: int = 0) -> torch.Tensor:
        return torch.randn(n, D, generator=_gen(seed))

    # -- the data plate: the idiom, or Pyro's own subsampled plate of size ``full``
    def plate(self, x: torch.Tensor, dim: int | None = None) -> pyro.plate:
        if self.full is not None:
            return pyro.plate("data", self.full, subsample=torch.arange(len(x)), dim=dim)
        return self.declare(x, dim)

    def declare(self, x: torch.Tensor, dim: int | None) -> pyro.plate:
        return pyro.plate("data", len(x), dim=dim)


class Amortised(Case):
    """z ~ N(0, I), x | z ~ N(W z + b, σ); q(z | x) = N(A x, s): the linear-Gaussian VAE, params by ``pyro.param``."""

    def decoder_params(self):
        w = pyro.param("w", 0.3 * torch.ones(D, Z) + 0.1 * torch.arange(D * Z).reshape(D, Z) / (D * Z))
        b = pyro.param("b", torch.zeros(D))
        return w, b

    def model(self, x):
        w, b = self.decoder_params()
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(x), Z]).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b, 0.7).to_event(1), obs=x)

    def encode(self, x):
        a = pyro.param("a", 0.2 * torch.ones(Z, D))
        s = pyro.param("s", 0.8 * torch.ones(Z), constraint=constraints.positive)
        return x @ a.T, s

    def guide(self, x):
        loc, s = self.encode(x)
        with self.plate(x):
            pyro.sample("z", dist.Normal(loc, s).to_event(1))


# ----------------------------------------------------------------------------------------------- plates
class SizedPlate(Amortised):
    idiom = 'a plate with a size: `pyro.plate("data", len(x))`'


class UnsizedPlate(Amortised):
    idiom = 'a plate without a size: `pyro.plate("data")` (Pyro\'s examples)'

    def declare(self, x, dim):
        return pyro.plate("data", dim=dim)


class SubsampleSize(Amortised):
    idiom = "`subsample_size`: the program subsamples its own batch (`pyro.plate(..., subsample_size=4)`)"
    n = 8
    minibatch = False  # it subsamples what it is given: its minibatch scale is tested in test_conformance
    scorable = "subsamples its data plate"

    def model(self, x):
        w, b = self.decoder_params()
        with pyro.plate("data", len(x), subsample_size=4) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(idx), Z]).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b, 0.7).to_event(1), obs=x[idx])

    def guide(self, x):
        a = pyro.param("a", 0.2 * torch.ones(Z, D))
        with pyro.plate("data", len(x), subsample_size=4) as idx:
            pyro.sample("z", dist.Normal(x[idx] @ a.T, 0.8).to_event(1))


class SubsampleIndices(Amortised):
    idiom = "`subsample=`: `model(x, idx, num_data)` opens `pyro.plate(\"data\", num_data, subsample=idx)`"

    def data(self, n, seed=0):
        return Call((self.x(n, seed), torch.arange(n)), {})

    def model(self, x, idx, num_data=None):
        w, b = self.decoder_params()
        with pyro.plate("data", num_data or len(x), subsample=idx):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(x), Z]).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b, 0.7).to_event(1), obs=x)

    def guide(self, x, idx, num_data=None):
        loc, s = self.encode(x)
        with pyro.plate("data", num_data or len(x), subsample=idx):
            pyro.sample("z", dist.Normal(loc, s).to_event(1))


class NestedPlates(Amortised):
    idiom = "nested plates: data at dim -2, a feature plate at dim -1 inside it"
    nesting = 2
    data_dim = -2

    def model(self, x):
        w, b = self.decoder_params()
        with self.plate(x, dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(1, Z), 1.0).to_event(1))  # (B, 1, Z)
            with pyro.plate("features", D, dim=-1):
                pyro.sample("x", dist.Normal(z.squeeze(-2) @ w.T + b, 0.7), obs=x)

    def guide(self, x):
        loc, s = self.encode(x)
        with self.plate(x, dim=-2):
            pyro.sample("z", dist.Normal(loc[:, None, :], s).to_event(1))


class DataPlateAtDimMinus2(Amortised):
    idiom = "the data plate at dim -2 (`pyro.plate(\"data\", dim=-2)`), an event dim of 1 to its right"
    nesting = 2
    data_dim = -2

    def model(self, x):
        w, b = self.decoder_params()
        with self.plate(x, dim=-2):  # a plate without a size broadcasts nothing: the site carries the batch
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), 1, Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b, 0.7).to_event(1), obs=x[:, None, :])

    def guide(self, x):
        loc, s = self.encode(x)
        with self.plate(x, dim=-2):
            pyro.sample("z", dist.Normal(loc[:, None, :], s).to_event(1))

    def declare(self, x, dim):
        return pyro.plate("data", dim=dim)


class NonNestedPlates(Amortised):
    idiom = "non-nested plates: per-feature global scales in their own plate beside the data plate"
    local = False
    vectorizable = False  # the feature plate and the data plate share dim -1
    refuse = {"iwae": "outside the data plate", "renyi": "outside the data plate"}

    def model(self, x):
        w, b = self.decoder_params()
        with pyro.plate("features", D):
            tau = pyro.sample("tau", dist.LogNormal(0.0, 0.5))
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(x), Z]).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b, 0.7 * tau).to_event(1), obs=x)

    def guide(self, x):
        m = pyro.param("tau_loc", torch.zeros(D))
        with pyro.plate("features", D):
            pyro.sample("tau", dist.LogNormal(m, 0.3))
        super().guide(x)


class ReusedPlate(Amortised):
    idiom = "a reused plate: one `pyro.plate` object entered twice"

    def model(self, x):
        w, b = self.decoder_params()
        data = self.plate(x)
        with data:
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(x), Z]).to_event(1))
        with data:
            pyro.sample("x", dist.Normal(z @ w.T + b, 0.7).to_event(1), obs=x)


class PlateStack(Amortised):
    idiom = "`pyro.plate_stack`: the data plate from a plate stack at dim -2 (found by the batch's size), features inside"
    nesting = 2
    data_dim = -2
    minibatch = False

    def model(self, x):
        b = pyro.param("b", torch.zeros(D))
        with pyro.plate_stack("rows", (len(x),), rightmost_dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([len(x), 1]))
            with pyro.plate("features", D, dim=-1):
                pyro.sample("x", dist.Normal(z + b, 0.7), obs=x)

    def guide(self, x):
        a = pyro.param("a", torch.tensor(0.3))
        with pyro.plate_stack("rows", (len(x),), rightmost_dim=-2):
            pyro.sample("z", dist.Normal(a * x.mean(-1, keepdim=True), 0.8))


class PlateInModelOnly(Amortised):
    idiom = "a plate in the model and not the guide: a global mean, the guide has no plate"
    local = False
    refuse = {"iwae": "outside the data plate", "renyi": "outside the data plate"}

    def model(self, x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        with self.plate(x):
            pyro.sample("x", dist.Normal(mu, 0.7).to_event(1), obs=x)

    def guide(self, x):
        loc = pyro.param("mu_loc", torch.zeros(D))
        scale = pyro.param("mu_scale", torch.ones(D), constraint=constraints.positive)
        pyro.sample("mu", dist.Normal(loc, scale).to_event(1))


class GlobalAndLocal(Amortised):
    idiom = "a global latent beside local ones (a shared offset outside the data plate)"
    local = False
    refuse = {"iwae": "outside the data plate", "renyi": "outside the data plate"}

    def model(self, x):
        w, b = self.decoder_params()
        c = pyro.sample("c", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(x), Z]).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b + c, 0.7).to_event(1), obs=x)

    def guide(self, x):
        pyro.sample("c", dist.Normal(pyro.param("c_loc", torch.zeros(D)), 0.5).to_event(1))
        super().guide(x)


# ---------------------------------------------------------------------------------------------- modules
class TutorialVAE(Case):
    """Pyro's VAE tutorial: an encoder and a decoder net, each registered by its own program."""

    idiom = "`pyro.module` in both: the decoder in the model, the encoder in the guide"

    def __init__(self, full=None):
        super().__init__(full)
        self.decoder = _net(Z, 8, D, seed=1)
        self.encoder = _net(D, 8, 2 * Z, seed=2)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.7).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with self.plate(x):
            loc, log_scale = self.encoder(x).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


class ModuleInModelOnly(TutorialVAE):
    idiom = "`pyro.module` in the model only (Pyro's conditional VAE): the guide uses nets the model registered"

    def __init__(self, full=None):
        super().__init__(full)
        self.nets = nn.ModuleDict({"decoder": self.decoder, "encoder": self.encoder})

    def model(self, x):
        pyro.module("nets", self.nets)
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.7).to_event(1), obs=x)

    def guide(self, x):
        with self.plate(x):
            loc, log_scale = self.encoder(x).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


class ModuleInGuideOnly(TutorialVAE):
    idiom = "`pyro.module` in the guide only: a fixed decoder the model does not train"

    def model(self, x):
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), Z), 1.0).to_event(1))
            with torch.no_grad():
                loc = self.decoder(z)
            pyro.sample("x", dist.Normal(loc, 0.7).to_event(1), obs=x)


class FrozenSubmodule(TutorialVAE):
    idiom = "a frozen submodule (`requires_grad_(False)`, a pre-trained baseline net under `torch.no_grad`)"

    def __init__(self, full=None):
        super().__init__(full)
        self.baseline = _net(D, 4, D, seed=3).requires_grad_(False)
        self.cvae = nn.ModuleDict({"baseline": self.baseline, "decoder": self.decoder})

    def model(self, x):
        pyro.module("cvae", self.cvae)
        with self.plate(x):
            with torch.no_grad():
                hint = self.baseline(x)
            z = pyro.sample("z", dist.Normal(0.1 * hint[..., :Z], 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.7).to_event(1), obs=x)


# ------------------------------------------------------------------------------------- sites and masks
class Deterministic(Amortised):
    idiom = "`pyro.deterministic` in the model"

    def model(self, x):
        w, b = self.decoder_params()
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(x), Z]).to_event(1))
            mean = pyro.deterministic("mean", z @ w.T + b, event_dim=1)
            pyro.sample("x", dist.Normal(mean, 0.7).to_event(1), obs=x)


class PoutineMask(Amortised):
    idiom = "`poutine.mask`: some datapoints' likelihood masked out by a data argument"

    def data(self, n, seed=0):
        return Call((self.x(n, seed), torch.arange(n) % 3 != 0), {})

    def model(self, x, keep):
        w, b = self.decoder_params()
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(x), Z]).to_event(1))
            with poutine.mask(mask=keep):
                pyro.sample("x", dist.Normal(z @ w.T + b, 0.7).to_event(1), obs=x)

    def guide(self, x, keep):
        super().guide(x)


class DistributionMask(PoutineMask):
    idiom = "`.mask()` on a distribution: missing features of each datapoint left out"

    def data(self, n, seed=0):
        return Call((self.x(n, seed), torch.rand(n, D, generator=_gen(seed + 1)) > 0.3), {})

    def model(self, x, observed):
        w, b = self.decoder_params()
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(x), Z]).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b, 0.7).mask(observed).to_event(1), obs=x)


class ObsMask(Amortised):
    idiom = "`obs_mask`: unobserved datapoints become a latent site `x_unobserved` the guide samples"

    def data(self, n, seed=0):
        return Call((self.x(n, seed), torch.arange(n) % 3 != 1), {})

    def model(self, x, observed):
        w, b = self.decoder_params()
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(x), Z]).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b, 0.7).to_event(1), obs=x, obs_mask=observed)

    def guide(self, x, observed):
        loc, s = self.encode(x)
        fill = pyro.param("fill", torch.zeros(D))
        with self.plate(x):
            pyro.sample("z", dist.Normal(loc, s).to_event(1))
            pyro.sample("x_unobserved", dist.Normal(fill.expand(len(x), D), 0.9).to_event(1).mask(~observed))


class Factor(Amortised):
    idiom = "`pyro.factor` in the data plate: a per-datapoint tilt of the latent"

    def model(self, x):
        w, b = self.decoder_params()
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(x), Z]).to_event(1))
            pyro.factor("tilt", -0.1 * z.pow(2).sum(-1))
            pyro.sample("x", dist.Normal(z @ w.T + b, 0.7).to_event(1), obs=x)


class GlobalFactor(Factor):
    idiom = "`pyro.factor` outside the data plate: a penalty on the parameters"
    local = False  # a term of no datapoint: log p(x) does not split per datapoint
    refuse = {"iwae": "outside the data plate", "renyi": "outside the data plate"}

    def model(self, x):
        w, _ = self.decoder_params()
        pyro.factor("shrink_w", -0.5 * w.pow(2).sum())
        super().model(x)


class ToEvent(Amortised):
    idiom = "`.to_event(2)`: image-shaped datapoints (2 × 3) scored as one event"

    def x(self, n, seed=0):
        return torch.randn(n, 2, D, generator=_gen(seed))

    def model(self, x):
        w, b = self.decoder_params()
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(x), Z]).to_event(1))
            loc = (z @ w.T + b)[..., None, :].expand(*z.shape[:-1], 2, D)
            pyro.sample("x", dist.Normal(loc, 0.7).to_event(2), obs=x)

    def guide(self, x):
        loc, s = self.encode(x.mean(-2))
        with self.plate(x):
            pyro.sample("z", dist.Normal(loc, s).to_event(1))


class ConstrainedParams(Amortised):
    idiom = "constrained `pyro.param`s: positive, simplex and interval constraints"

    def model(self, x):
        w, b = self.decoder_params()
        sigma = pyro.param("sigma", torch.tensor(0.7), constraint=constraints.positive)
        mix = pyro.param("mix", torch.full((D,), 1.0 / D), constraint=constraints.simplex)
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(x), Z]).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b + mix, sigma).to_event(1), obs=x)

    def guide(self, x):
        a = pyro.param("a", 0.2 * torch.ones(Z, D))
        s = pyro.param("s", torch.full((Z,), 0.6), constraint=constraints.interval(0.05, 2.0))
        with self.plate(x):
            pyro.sample("z", dist.Normal(x @ a.T, s).to_event(1))


class PoutineScale(Amortised):
    idiom = "`poutine.scale`: a tempered likelihood (scale 0.5)"

    def model(self, x):
        w, b = self.decoder_params()
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(x), Z]).to_event(1))
            with poutine.scale(scale=0.5):
                pyro.sample("x", dist.Normal(z @ w.T + b, 0.7).to_event(1), obs=x)


class NonReparameterised(Case):
    idiom = "a non-reparameterised latent (a Bernoulli switch per datapoint, score-function gradients)"
    refuse = {"meanfield": "fully reparameterized", "iwae": "reparameterised", "renyi": "reparameterised"}
    vectorizable = False  # `.expand([len(x), D])` of a particle-shaped loc fails

    def model(self, x):
        loc = pyro.param("loc", torch.tensor([-0.5, 0.5]))
        with self.plate(x):
            s = pyro.sample("s", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(loc[s.long()][..., None], 1.0).expand([len(x), D]).to_event(1), obs=x)

    def guide(self, x):
        w = pyro.param("w", torch.full((D,), 0.1))
        with self.plate(x):
            pyro.sample("s", dist.Bernoulli(logits=x @ w))


class Enumerated(Case):
    idiom = "an enumerated discrete latent (`config_enumerate`, parallel) with `max_plate_nesting=1`"
    refuse = {name: "enumerat" for name in ("trace", "meanfield", "tracegraph", "iwae", "renyi")}

    def model(self, x):
        weights = pyro.param("weights", torch.tensor([0.4, 0.6]), constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([[-1.0, 0.0, 0.5], [1.0, 0.2, -0.5]]))
        with self.plate(x):
            c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(x), Z]).to_event(1))
            pyro.sample("x", dist.Normal(locs[c] + 0.3 * z.sum(-1, keepdim=True), 0.7).to_event(1), obs=x)

    def guide(self, x):
        a = pyro.param("a", 0.2 * torch.ones(Z, D))
        with self.plate(x):
            pyro.sample("z", dist.Normal(x @ a.T, 0.8).to_event(1))


class EnumeratedGuide(Case):
    idiom = "a guide site marked for enumeration (`config_enumerate(guide)`, as the semi-supervised VAE)"
    refuse = {name: "enumerat" for name in ("trace", "meanfield", "tracegraph", "iwae", "renyi")}

    def model(self, x):
        locs = pyro.param("locs", torch.tensor([[-1.0, 0.0, 0.5], [1.0, 0.2, -0.5]]))
        with self.plate(x):
            c = pyro.sample("c", dist.Categorical(torch.tensor([0.5, 0.5])))
            pyro.sample("x", dist.Normal(locs[c], 0.7).to_event(1), obs=x)

    @config_enumerate
    def guide(self, x):
        w = pyro.param("wc", torch.zeros(D, 2))
        with self.plate(x):
            pyro.sample("c", dist.Categorical(logits=x @ w))


# ----------------------------------------------------------------------------------------- arguments
class SeveralArguments(Amortised):
    idiom = "several data arguments: `model(x, y)` with a label that shifts the prior"

    def data(self, n, seed=0):
        return Call((self.x(n, seed), (torch.arange(n) % 2).float()), {})

    def model(self, x, y):
        w, b = self.decoder_params()
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(0.5 * y[:, None].expand(len(x), Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b, 0.7).to_event(1), obs=x)

    def guide(self, x, y):
        loc, s = self.encode(x)
        with self.plate(x):
            pyro.sample("z", dist.Normal(loc + 0.1 * y[:, None], s).to_event(1))


class KeywordData(SeveralArguments):
    idiom = "keyword data: `model(x, *, labels)`, trained from `TensorData(x, labels=y)`"

    def data(self, n, seed=0):
        args = super().data(n, seed).args
        return Call((args[0],), {"labels": args[1]})

    def model(self, x, *, labels):
        super().model(x, labels)

    def guide(self, x, *, labels):
        super().guide(x, labels)


class OptionalLabels(Amortised):
    idiom = "`model(xs, ys=None)` (Pyro's conditional VAE): ys observed when given, sampled when not"

    def data(self, n, seed=0):
        return Call((self.x(n, seed), (torch.arange(n) % 2).float()), {})

    def model(self, xs, ys=None):
        w, b = self.decoder_params()
        with self.plate(xs):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).expand([len(xs), Z]).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b, 0.7).to_event(1), obs=xs)
            pyro.sample("y", dist.Bernoulli(logits=z.sum(-1)), obs=ys)

    def guide(self, xs, ys=None):
        loc, s = self.encode(xs)
        with self.plate(xs):
            pyro.sample("z", dist.Normal(loc, s).to_event(1))


class ClosedOver(Amortised):
    idiom = "data closed over: `model()` and `guide()` take no argument (`fit(model, guide, None)`)"
    minibatch = False

    def __init__(self, full=None):
        super().__init__(full)
        self.observed = self.x(self.n, seed=5)

    def data(self, n, seed=0):
        return Call((), {})

    def model(self):
        super().model(self.observed)

    def guide(self):
        super().guide(self.observed)


class Auxiliary(Amortised):
    idiom = "an auxiliary guide site (`infer={\"is_auxiliary\": True}`) the model does not have"
    refuse = {"iwae": "auxiliary", "renyi": "auxiliary"}
    scorable = "auxiliary"

    def guide(self, x):
        loc, s = self.encode(x)
        with self.plate(x):
            u = pyro.sample("u", dist.Normal(loc, 1.0).to_event(1), infer={"is_auxiliary": True})
            pyro.sample("z", dist.Normal(0.5 * (loc + u), s).to_event(1))


CASES: list[type[Case]] = [
    SizedPlate,
    UnsizedPlate,
    SubsampleSize,
    SubsampleIndices,
    NestedPlates,
    DataPlateAtDimMinus2,
    NonNestedPlates,
    ReusedPlate,
    PlateStack,
    PlateInModelOnly,
    GlobalAndLocal,
    TutorialVAE,
    ModuleInModelOnly,
    ModuleInGuideOnly,
    FrozenSubmodule,
    Deterministic,
    PoutineMask,
    DistributionMask,
    ObsMask,
    Factor,
    GlobalFactor,
    ToEvent,
    ConstrainedParams,
    PoutineScale,
    NonReparameterised,
    Enumerated,
    EnumeratedGuide,
    SeveralArguments,
    KeywordData,
    OptionalLabels,
    ClosedOver,
    Auxiliary,
]
