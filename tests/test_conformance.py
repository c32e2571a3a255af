"""Conformance: whatever Pyro's SVI trains, ``fit`` trains the same way; whatever has local latents,
``log_likelihood`` scores right; what pyrovae cannot do right is refused in one line. Checked on the corpus of
``tests/corpus.py`` (Pyro's idioms), estimator by estimator.

Exactness: both sides draw from one seeded RNG in the same order (fit's probe runs off the RNG), and Adam is
elementwise, so one ``torch.optim.Adam`` over all parameters is Pyro's per-parameter ``pyro.optim.Adam``:
losses and parameters agree to float32 rounding (relative 1e-5; foreach and per-tensor kernels round apart).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager, nullcontext

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import (
    ELBO,
    SVI,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from pyro.poutine.util import site_is_subsample

from pyrovae import PyrovaeError, TensorData, fit, log_likelihood
from pyrovae.data import Call
from pyrovae.infer import ESTIMATORS, MeanField, RenyiBound, Trace
from pyrovae.infer.handlers import DataScale

from .corpus import CASES, Case, Enumerated, EnumeratedGuide, SubsampleSize

STEPS, LR, SEED = 3, 0.05, 11
PARTICLES = {"trace": 1, "meanfield": 1, "tracegraph": 1, "iwae": 3, "renyi": 3}
ALPHA = {"renyi": 0.5}


@pytest.fixture(autouse=True)
def clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# ------------------------------------------------------------------------------------ the bound written out
class WrittenRenyi(ELBO):
    """The per-datapoint Rényi bound (α = 0: IWAE) written out for ``pyro.infer.SVI``: K particles drawn in a
    particle plate left of the program's plates, per-datapoint log-weights from each site's log-probability
    (masked and scaled, with the minibatch scale N/B divided out), L_α per datapoint, and the sum times N/B."""

    def __init__(self, alpha: float, k: int, case: Case) -> None:
        super().__init__(num_particles=k, max_plate_nesting=case.nesting)
        self.alpha, self.k, self.pdim, self.ddim = alpha, k, -case.nesting - 1, case.data_dim

    def _bound(self, model, guide, args, kwargs) -> torch.Tensor:
        with pyro.plate("particles", self.k, dim=self.pdim):
            guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
            model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
        log_w, n_over_b = 0.0, 1.0
        for sign, tr in ((1.0, model_tr), (-1.0, guide_tr)):
            for site in tr.nodes.values():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                lp = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
                for f in site["cond_indep_stack"]:
                    if f.name == "data" and f.full_size not in (None, -1, f.size):
                        n_over_b = f.full_size / f.size
                        lp = lp / n_over_b
                while lp.dim() < -self.pdim:
                    lp = lp.unsqueeze(0)
                log_w = log_w + sign * _to_points(lp, self.pdim, self.ddim)
        a = 1.0 - self.alpha
        bound = (torch.logsumexp(a * log_w, dim=0) - math.log(self.k)) / a
        return -n_over_b * bound.sum()

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("the bound is computed whole by _bound")

    def loss(self, model, guide, *args, **kwargs):
        with torch.no_grad():
            return self._bound(model, guide, args, kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self._bound(model, guide, args, kwargs)
        loss.backward()
        return loss.item()


def _to_points(lp: torch.Tensor, pdim: int, ddim: int) -> torch.Tensor:
    """A log-probability summed over every dim but the particles' and the datapoints': (K, B)."""
    keep = (lp.dim() + pdim, lp.dim() + ddim)
    other = [d for d in range(lp.dim()) if d not in keep]
    if other:  # (a sum over an empty list of dims would sum them all)
        lp = lp.sum(other, keepdim=True)
    return lp.reshape(lp.shape[keep[0]], lp.shape[keep[1]])


def counterpart(name: str, case: Case) -> ELBO:
    """Pyro's estimator (or the bound written out) that a registered pyrovae estimator must equal."""
    k = PARTICLES[name]
    if name == "trace":
        return Trace_ELBO(num_particles=k)
    if name == "meanfield":
        return TraceMeanField_ELBO(num_particles=k)
    if name == "tracegraph":
        return TraceGraph_ELBO(num_particles=k)
    return WrittenRenyi(ALPHA.get(name, 0.0), k, case)


# ----------------------------------------------------------------------------------------- the two sides
def dataset(call: Call) -> TensorData | None:
    if not call.args and not call.kwargs:
        return None
    return TensorData(*call.args, **call.kwargs)


def indexed(call: Call, idx: torch.Tensor) -> Call:
    return Call(tuple(a[idx] for a in call.args), {key: v[idx] for key, v in call.kwargs.items()})


def svi_run(case: Case, elbo: ELBO, data: Call, epochs: int, batch: int, **extra) -> tuple[list[float], dict]:
    """``epochs`` of ``pyro.infer.SVI`` in fit's order (a permutation per epoch, batches cut from it); the loss of
    each epoch as fit reports it (Σ loss_b · B/N) and the parameters after."""
    n = max(1, len(data.args[0]) if data.args else len(next(iter(data.kwargs.values()), [0])))
    pyro.set_rng_seed(SEED)
    svi = SVI(case.model, case.guide, pyro.optim.Adam({"lr": LR}), elbo)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(n)
        total = 0.0
        for start in range(0, n, batch):
            idx = perm[start : start + batch]
            call = indexed(data, idx) if data.args or data.kwargs else data
            loss = svi.step(*call.args, **call.kwargs, **extra)
            assert isinstance(loss, float)
            total += loss * len(idx) / n
        losses.append(total)
    return losses, {name: v.detach().clone() for name, v in pyro.get_param_store().items()}


def fit_run(case: Case, data: Call, epochs: int, batch: int, **options) -> tuple[list[float], dict]:
    n = max(1, len(data.args[0]) if data.args else len(next(iter(data.kwargs.values()), [0])))
    result = fit(case.model, case.guide, dataset(data), epochs=epochs, batch_size=batch, lr=LR, seed=SEED,
                 quiet=True, **options)  # fmt: skip
    assert result.epochs_done == epochs
    return [-row["train_elbo"] * n for row in result.history], result.params


def assert_same(ours: tuple[list[float], dict], theirs: tuple[list[float], dict]) -> None:
    (our_losses, our_params), (their_losses, their_params) = ours, theirs
    for a, b in zip(our_losses, their_losses):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5), (our_losses, their_losses)
    assert set(our_params) <= set(their_params), (set(our_params), set(their_params))
    assert our_params, "nothing was trained"
    for name, p in our_params.items():
        assert torch.allclose(p, their_params[name], rtol=1e-5, atol=1e-6), name


def _ids(cases):
    return [c.__name__ for c in cases]


@contextmanager
def _quiet():
    """Pyro's warnings about the programs (auxiliary sites, mean-field order) are the same on both sides."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------------------------- fit ≡ SVI
@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("case_cls", CASES, ids=_ids(CASES))
def test_fit_equals_svi_or_refuses_in_one_line(case_cls, name):
    """Each registered estimator: 3 full-batch steps of fit equal 3 of SVI with Pyro's counterpart, or fit refuses
    before the first step with a one-line error naming what it cannot do."""
    case = case_cls()
    data = case.data(case.n)
    options = dict(elbo=name, particles=PARTICLES[name], alpha=ALPHA.get(name))
    batch = case.n
    if name in case.refuse:
        before = {key: v.clone() for key, v in _state(case).items()}
        with pytest.raises(PyrovaeError, match=case.refuse[name]) as err:
            fit_run(case, data, STEPS, batch, **options)
        assert "\n" not in str(err.value)
        assert all(torch.equal(v, _state(case)[key]) for key, v in before.items()), "a step was taken"
        return
    with _quiet():
        theirs = svi_run(case_cls(), counterpart(name, case), data, STEPS, batch)
        pyro.clear_param_store()
        ours = fit_run(case, data, STEPS, batch, **options)
    assert_same(ours, theirs)


def _state(case: Case) -> dict:
    return {f"{key}.{n}": p for key, m in vars(case).items() if isinstance(m, torch.nn.Module)
            for n, p in m.state_dict().items()}  # fmt: skip


VECTORISED = [c for c in CASES if c.vectorizable and "trace" not in c.refuse]


@pytest.mark.parametrize("case_cls", VECTORISED, ids=_ids(VECTORISED))
def test_vectorised_particles_equal_pyros(case_cls):
    """3 vectorised particles (fit's default for K > 1) against Trace_ELBO(vectorize_particles=True)."""
    case = case_cls()
    data = case.data(case.n)
    with _quiet():
        pyro_elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=case.nesting)
        theirs = svi_run(case_cls(), pyro_elbo, data, STEPS, case.n)
        pyro.clear_param_store()
        ours = fit_run(case, data, STEPS, case.n, elbo="trace", particles=3, max_plate_nesting=case.nesting)
    assert_same(ours, theirs)


@pytest.mark.parametrize("case_cls", [Enumerated, EnumeratedGuide], ids=_ids([Enumerated, EnumeratedGuide]))
def test_enumerated_programs_train_with_pyros_traceenum(case_cls):
    """The enumerating estimator, given as Pyro's instance, trains as under SVI (full batch and minibatches)."""
    case = case_cls()
    data = case.data(12)
    for batch in (12, 4):
        theirs = svi_run(case_cls(full=12 if batch < 12 else None), TraceEnum_ELBO(max_plate_nesting=1), data, 2, batch)
        pyro.clear_param_store()
        ours = fit_run(case, data, 2, batch, elbo=TraceEnum_ELBO(max_plate_nesting=1))
        assert_same(ours, theirs)
        pyro.clear_param_store()


MINIBATCHED = [c for c in CASES if c.minibatch]


@pytest.mark.parametrize("name", ["trace", "iwae"])
@pytest.mark.parametrize("case_cls", MINIBATCHED, ids=_ids(MINIBATCHED))
def test_minibatches_equal_pyros_own_subsampled_plate(case_cls, name):
    """On minibatches of 4 of 12, fit's scaled loss and steps equal SVI on the same program opening its data plate
    as ``pyro.plate("data", 12, subsample=...)`` (Pyro's own scale), over 2 epochs of 3 steps."""
    case = case_cls()
    if name in case.refuse:
        pytest.skip(f"{name} refuses this program (tested above)")
    data = case.data(12)
    extra = {"num_data": 12} if "num_data" in case.model.__code__.co_varnames else {}
    with _quiet():
        theirs = svi_run(case_cls(full=12), counterpart(name, case), data, 2, 4, **extra)
        pyro.clear_param_store()
        ours = fit_run(case, data, 2, 4, elbo=name, particles=PARTICLES[name])
    assert_same(ours, theirs)


def test_a_program_that_subsamples_its_batch_is_scaled_to_the_whole_data():
    # SubsampleSize opens pyro.plate("data", len(x), subsample_size=4) on the batch it is given: Pyro scales its
    # sites by B/4, DataScale by N/B more, so each stands for N/4 datapoints.
    case = SubsampleSize()
    x = case.data(8).args[0]
    with DataScale(40, batch_size=8):
        tr = poutine.trace(case.model).get_trace(x)
    assert math.isclose(float(tr.nodes["x"]["scale"]), 40 / 4, rel_tol=1e-6)
    assert math.isclose(float(tr.nodes["z"]["scale"]), 40 / 4, rel_tol=1e-6)


# -------------------------------------------------------------------------------------- refusals in one line
def test_minibatches_of_a_program_without_a_data_plate_are_refused():
    def model(x):
        w = pyro.param("w", torch.zeros(3))
        pyro.sample("x", pyro.distributions.Normal(w, 1.0).expand(x.shape).to_event(2), obs=x)

    def guide(x):
        pass

    x = torch.randn(12, 3)
    with pytest.raises(PyrovaeError, match="no plate holds the batch's 4 datapoints") as err:
        fit(model, guide, x, elbo="trace", batch_size=4, epochs=1, quiet=True)
    assert "\n" not in str(err.value)
    fit(model, guide, x, elbo="trace", batch_size=12, epochs=1, quiet=True)  # the full batch needs no scale


def test_an_observed_site_outside_the_data_plate_is_refused_on_minibatches():
    def model(x):
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data"):
            z = pyro.sample("z", pyro.distributions.Normal(0.0, 1.0).expand([len(x)]))
        pyro.sample("x", pyro.distributions.Normal(loc + z[:, None], 1.0).to_event(2), obs=x)

    def guide(x):
        with pyro.plate("data"):
            pyro.sample("z", pyro.distributions.Normal(pyro.param("m", torch.zeros(len(x))), 1.0))

    x = torch.randn(12, 3)
    with pytest.raises(PyrovaeError, match="observed site 'x' is outside the data plate 'data'") as err:
        fit(model, guide, x, elbo="trace", batch_size=4, epochs=1, quiet=True)
    assert "\n" not in str(err.value)


def test_a_site_without_a_datapoint_dim_in_an_unsized_plate_is_refused_on_minibatches():
    def model(x):
        with pyro.plate("data"):
            pyro.sample("x", pyro.distributions.Normal(pyro.param("loc", torch.zeros(3)), 1.0).to_event(1), obs=x)
            pyro.sample("shared", pyro.distributions.Normal(0.0, 1.0))

    def guide(x):
        with pyro.plate("data"):
            pyro.sample("shared", pyro.distributions.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    with pytest.raises(PyrovaeError, match="site 'shared' has 1 along the data plate 'data'"):
        fit(model, guide, torch.randn(12, 3), elbo="trace", batch_size=4, epochs=1, quiet=True)


def test_settings_beside_an_instance_are_refused():
    case = UnsizedCase = CASES[1]()  # noqa: F841
    with pytest.raises(PyrovaeError, match="set them on the instance"):
        fit(case.model, case.guide, case.data(6).args[0], elbo=Trace_ELBO(), max_plate_nesting=1, quiet=True)


# ----------------------------------------------------------------------------- log_likelihood ≡ by hand
def importance_by_hand(case: Case, call: Call, k: int, vectorised: bool) -> torch.Tensor:
    """log (1/K) Σ_k p(x_i, z_ik)/q(z_ik|x_i) per datapoint, with K particles drawn at once in a particle plate (or
    one per run, in turn); enumerated model sites summed over their values one by one."""
    if not vectorised:
        log_w = torch.cat([_log_weights(case, call, 1, None) for _ in range(k)])
    else:
        log_w = _log_weights(case, call, k, -case.nesting - 1)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


def _log_weights(case: Case, call: Call, k: int, pdim: int | None) -> torch.Tensor:
    particles = pyro.plate("particles", k, dim=pdim) if pdim is not None else nullcontext()
    pdim = pdim if pdim is not None else -case.nesting - 1  # a particle dim of 1 where there is none
    ddim = case.data_dim
    with torch.no_grad(), particles:
        guide_tr = poutine.trace(case.guide).get_trace(*call.args, **call.kwargs)
        model_tr = poutine.trace(poutine.replay(case.model, trace=guide_tr)).get_trace(*call.args, **call.kwargs)
        enumerated = [s for s in model_tr.nodes.values() if s["type"] == "sample" and s["infer"].get("enumerate")
                      and s["name"] not in guide_tr.nodes]  # fmt: skip
        if enumerated:
            site = enumerated[0]
            values = site["fn"].enumerate_support(expand=False)
            joint = []
            for v in values:
                fixed = v.reshape(-1).expand(site["value"].shape)
                cond = poutine.condition(poutine.replay(case.model, trace=guide_tr), data={site["name"]: fixed})
                joint.append(_per_point(poutine.trace(cond).get_trace(*call.args, **call.kwargs), pdim, ddim, k))
            log_p = torch.logsumexp(torch.stack(joint), dim=0)
        else:
            log_p = _per_point(model_tr, pdim, ddim, k)
    return log_p - _per_point(guide_tr, pdim, ddim, k)


def _per_point(tr, pdim: int, ddim: int, k: int) -> torch.Tensor:
    total = 0.0
    for site in tr.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
        while lp.dim() < -min(pdim, ddim):
            lp = lp.unsqueeze(0)
        total = total + _to_points(lp, pdim, ddim)
    return total


SCORED = [c for c in CASES if c.local and c.name != "ClosedOver" and not c.scorable]


@pytest.mark.parametrize("case_cls", SCORED, ids=_ids(SCORED))
def test_log_likelihood_equals_importance_sampling_by_hand(case_cls):
    """Every program whose latents are all local: log_likelihood (one call of K = 64 particles, or one particle per
    call where the program breaks under a particle dim) equals the estimate written out above with the same draws
    (float32 rounding: 1e-4 nats)."""
    case = case_cls()
    call = case.data(case.n)
    pyro.set_rng_seed(3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours = log_likelihood(case.model, case.guide, *call.args, num_samples=64, chunk_size=64,
                              batch_size=case.n, **call.kwargs)  # fmt: skip
    fell_back = any("one particle per call" in str(w.message) for w in seen)
    assert fell_back == (not case.vectorizable)
    pyro.set_rng_seed(3)
    theirs = importance_by_hand(case, call, 64, vectorised=not fell_back)
    assert ours.shape == (case.n,)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours, theirs)


REFUSED = [c for c in CASES if not c.local or c.scorable]


@pytest.mark.parametrize("case_cls", REFUSED, ids=_ids(REFUSED))
def test_log_likelihood_refuses_what_it_cannot_score_in_one_line(case_cls):
    case = case_cls()
    call = case.data(case.n)
    with pytest.raises(PyrovaeError, match=case.scorable or "not defined") as err:
        log_likelihood(case.model, case.guide, *call.args, num_samples=8, **call.kwargs)
    assert "\n" not in str(err.value)


# -------------------------------------------------------------------------- drop-in Pyro ELBOs under SVI
DROP_IN = [(Trace, Trace_ELBO), (MeanField, TraceMeanField_ELBO)]


@pytest.mark.parametrize("ours_cls,pyros_cls", DROP_IN, ids=["Trace", "MeanField"])
@pytest.mark.parametrize("case_cls", CASES, ids=_ids(CASES))
def test_pyrovae_estimators_are_drop_in_pyro_elbos(case_cls, ours_cls, pyros_cls):
    """Under plain SVI, pyrovae's class and Pyro's give the same float losses, parameters and errors."""
    case = case_cls()
    data = case.data(case.n)
    outcomes = []
    for cls in (pyros_cls, ours_cls):
        pyro.clear_param_store()
        try:
            with _quiet():
                outcomes.append(svi_run(case_cls(), cls(), data, STEPS, case.n))
                pyro.set_rng_seed(1)
                loss = cls().loss(case_cls().model, case_cls().guide, *data.args, **data.kwargs)
            assert isinstance(loss, float)
            outcomes[-1][0].append(loss)
        except Exception as e:  # noqa: BLE001 - the two classes must fail alike
            outcomes.append((type(e), str(e)))
    if isinstance(outcomes[0], tuple) and isinstance(outcomes[0][0], type):
        assert outcomes[1] == outcomes[0]
    else:
        assert_same(outcomes[1], outcomes[0])


LOCAL_REPARAM = [c for c in CASES if c.local and not c.scorable and c.name not in ("ClosedOver", "SubsampleSize")
                 and "iwae" not in c.refuse]  # fmt: skip


@pytest.mark.parametrize("case_cls", LOCAL_REPARAM, ids=_ids(LOCAL_REPARAM))
def test_renyi_bound_equals_pyros_renyi_elbo_on_one_datapoint(case_cls):
    """On one datapoint the per-datapoint bound is Pyro's RenyiELBO (which bounds the batch jointly): same floats
    under SVI with the same vectorised draws."""
    case = case_cls()
    data = indexed(case.data(case.n), torch.arange(1))
    with _quiet():
        theirs = svi_run(case_cls(), RenyiELBO(0.5, 3, max_plate_nesting=case.nesting, vectorize_particles=True),
                         data, STEPS, 1)  # fmt: skip
        pyro.clear_param_store()
        ours = svi_run(case_cls(), RenyiBound(0.5, 3, max_plate_nesting=case.nesting), data, STEPS, 1)
    assert_same(ours, theirs)


def test_extra_loss_terms_equal_svi_on_the_programs_run_together():
    # fit(..., extra=[(m2, g2)]) adds m2/g2's loss to the main pair's on every step: the same as SVI on one program
    # that runs both (their sites are distinct), on minibatches of 4 of 12 with the unsized plate of Pyro's examples.
    case = CASES[1]()  # UnsizedPlate
    data = case.data(12)

    def aux_model(x):
        c = pyro.param("c", torch.tensor(0.3))
        with pyro.plate("data"):
            pyro.sample("x0", pyro.distributions.Normal(c, 1.0).expand([len(x)]), obs=x[:, 0])

    def aux_guide(x):
        pass

    ref = type(case)(full=12)

    def aux_ref(x):  # Pyro's own scale for 4 of 12 (a second subsampled plate named "data" would clash)
        c = pyro.param("c", torch.tensor(0.3))
        with pyro.plate("aux", len(x)), poutine.scale(scale=12 / len(x)):
            pyro.sample("x0", pyro.distributions.Normal(c, 1.0).expand([len(x)]), obs=x[:, 0])

    class Together(Case):
        def model(self, x):
            ref.model(x)
            aux_ref(x)

        def guide(self, x):
            ref.guide(x)

    theirs = svi_run(Together(), Trace_ELBO(), data, 2, 4)
    pyro.clear_param_store()
    ours = fit_run(case, data, 2, 4, elbo="trace", extra=[(aux_model, aux_guide)])
    assert "c" in ours[1]
    assert_same(ours, theirs)


def test_pyros_elbo_settings_reach_the_registered_estimators():
    from pyrovae.infer import make_elbo

    elbo = make_elbo("trace", 3, None, max_plate_nesting=2, vectorize_particles=False, strict_enumeration_warning=False)
    assert isinstance(elbo, Trace) and elbo.max_plate_nesting == 2 and not elbo.vectorize_particles
    assert elbo.strict_enumeration_warning is False
    assert make_elbo("trace", 3, None).vectorize_particles  # vectorised by default for K > 1
    iwae = make_elbo("iwae", 4, None, max_plate_nesting=1)
    assert isinstance(iwae, RenyiBound) and iwae.max_plate_nesting == 2  # Pyro adds the particle plate's dim
    with pytest.raises(PyrovaeError, match="unknown ELBO setting 'retain_graph'"):
        make_elbo("trace", 1, None, retain_graph=True)


def test_closed_over_data_trains_one_full_step_per_epoch():
    # fit(model, guide, None): the program takes no argument; each epoch is one step on all of its data.
    case = CASES[[c.__name__ for c in CASES].index("ClosedOver")]()
    initial = case.decoder_params()[0].detach().clone()
    pyro.clear_param_store()
    result = fit(case.model, case.guide, None, elbo="meanfield", epochs=4, lr=0.05, seed=0, quiet=True)
    assert result.epochs_done == 4 and len(result.history) == 4
    assert (result.params["w"] - initial).abs().max() > 0.05  # it trained: 4 Adam steps of 0.05
