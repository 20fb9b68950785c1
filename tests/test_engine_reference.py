"""`qjax.quantize_model` against an independent NumPy transcription of the papers, whole models.

The reference below is written from the papers alone, in float64, with Python loops, and uses
nothing of qjax: its own forward passes (Dense, and Conv through its own patch matrices), its
own alphabets and its own GPFQ and GPTQ.

* GPFQ (Lybrand & Saab): layer by layer, X from the float network and X~ from the network whose
  earlier layers are already quantized; for each neuron w, u_0 = 0 and for t = 1..N0

      q_t = Q(<X~_t, u_{t-1} + w_t X_t> / ||X~_t||²),      u_t = u_{t-1} + w_t X_t - q_t X~_t.

* GPTQ (Frantar et al., Algorithm 1): H = X~ᵀX~ (dead inputs H_tt = 1, w_t = 0), damped by
  λ·mean(diag H); U the upper Cholesky factor of H⁻¹; q_t = Q(w_t), e_t = (w_t - q_t)/U_tt,
  w_s ← w_s - U_ts e_t for s > t.

The engine runs in float32 (and, with `jax.enable_x64`, in float64), so a letter may differ from
the float64 reference where the rounding argument lies within the engine's rounding error of a
decision boundary (the midpoint of two letters). The comparison allows exactly that and nothing
else: at each step the reference takes the engine's letter only if it is the other neighbour of
the boundary and the argument is within a bound of it derived from the engine's unit roundoff ε
(see `gpfq_layer` and `gptq_layer`); any other difference fails. The reference then goes on
from the engine's letter, so one near-tie does not change the rest. GPTQ's bound carries the
condition number of H, which makes it loose in float32; the float64 runs, whose bounds are
about 1e-9 of a step, check its letters exactly.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax import LayerSpec

U32 = 2.0**-24  # unit roundoff of float32
U64 = 2.0**-53  # unit roundoff of float64
# At most this fraction of the letters may come from near-ties: more would make the test weak.
MAX_NEAR_TIE_FRACTION = 0.01


def gamma(k: int, unit: float) -> float:
    """γ_k = k·ε / (1 - k·ε): the relative error bound of k operations in a row."""
    return k * unit / (1 - k * unit)


# ------------------------------------------------------------------------------------------
# The models, and their forward passes in NumPy.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    name: str
    relu: bool


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    name: str
    kernel_size: int
    stride: int
    pad: int
    relu: bool


class MLP(nn.Module):
    """Three Dense layers, ReLU between."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(12)(x))
        return nn.Dense(5)(x)


MLP_LAYERS = (
    DenseLayer("Dense_0", True),
    DenseLayer("Dense_1", True),
    DenseLayer("Dense_2", False),
)


class CNN(nn.Module):
    """Two convolutions (padded, then strided) and a Dense head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)))(x))
        x = nn.relu(nn.Conv(6, (3, 3), strides=(2, 2), padding="VALID")(x))
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


CNN_LAYERS = (
    ConvLayer("Conv_0", 3, 1, 1, True),
    ConvLayer("Conv_1", 3, 2, 0, True),
    DenseLayer("Dense_0", False),
)


class NNXMLP(nnx.Module):
    """The MLP in NNX (same layer sizes)."""

    def __init__(self, rngs):
        self.fc0 = nnx.Linear(10, 16, rngs=rngs)
        self.fc1 = nnx.Linear(16, 12, rngs=rngs)
        self.fc2 = nnx.Linear(12, 5, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(nnx.relu(self.fc0(x)))))


def patches(images: np.ndarray, layer: ConvLayer) -> np.ndarray:
    """Patch matrix (batch·positions, k·k·cin), columns in the order of the kernel (kh, kw, cin)
    flattened, so that patches @ kernel.reshape(-1, cout) is the convolution."""
    k, s, p = layer.kernel_size, layer.stride, layer.pad
    x = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    n, height, width, cin = x.shape
    out_h, out_w = (height - k) // s + 1, (width - k) // s + 1
    rows = np.empty((n, out_h, out_w, k, k, cin), x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            rows[:, i, j] = x[:, i * s : i * s + k, j * s : j * s + k, :]
    return rows.reshape(n * out_h * out_w, k * k * cin)


def layer_rows(layer, x: np.ndarray) -> np.ndarray:
    """The layer's input rows: X (m × N0)."""
    if isinstance(layer, ConvLayer):
        return patches(x, layer)
    return x.reshape(x.shape[0], -1)


def layer_output(layer, x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    out = layer_rows(layer, x) @ kernel.reshape(-1, kernel.shape[-1]) + bias
    if isinstance(layer, ConvLayer):
        k, s, p = layer.kernel_size, layer.stride, layer.pad
        side = (x.shape[1] + 2 * p - k) // s + 1
        out = out.reshape(x.shape[0], side, side, -1)
    return np.maximum(out, 0) if layer.relu else out


# ------------------------------------------------------------------------------------------
# Alphabets: letters step·(k - (n-1)/2), k = 0..n-1; Q is the nearest letter, ties to the lower.
# ------------------------------------------------------------------------------------------


def steps_for(w: np.ndarray, *, num_letters: int, c: float, group_size: int | None):
    """The step of each weight (N0, N1) for radius R = C·max|w| over its output channel (or over
    its group of `group_size` inputs of the channel): letters R·linspace(-1, 1, n)."""
    magnitude = np.abs(w)
    if group_size is None:
        radius = np.broadcast_to(magnitude.max(axis=0), w.shape)
    else:
        radius = np.empty_like(w)
        for start in range(0, w.shape[0], group_size):
            group = slice(start, start + group_size)
            radius[group] = magnitude[group].max(axis=0)
    return 2 * c * radius / (num_letters - 1)


def nearest(argument: float, step: float, num_letters: int) -> int:
    letters = step * (np.arange(num_letters) - (num_letters - 1) / 2)
    return int(np.argmin(np.abs(letters - argument)))  # argmin: the first, i.e. lower, on a tie


class Letters:
    """The engine's codes of one layer and the bookkeeping of near-ties.

    `choose(t, n, argument, bound)` returns the reference's code for input t of neuron n; if the
    engine chose the other letter next to a decision boundary within `bound` of the argument,
    the engine's code (a near-tie); any other difference is recorded as a mismatch.
    """

    def __init__(self, name, engine_q, steps, num_letters):
        self.name, self.steps, self.num_letters = name, steps, num_letters
        center = (num_letters - 1) / 2
        codes = np.asarray(engine_q, np.float64) / steps + center
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3, err_msg=f"{name}: letters")
        self.engine = np.round(codes).astype(int)
        self.near_ties, self.mismatches = 0, []

    def choose(self, t: int, n: int, argument: float, bound: float) -> int:
        step = self.steps[t, n]
        mine, theirs = nearest(argument, step, self.num_letters), self.engine[t, n]
        if mine == theirs:
            return mine
        boundary = step * ((mine + theirs) / 2 - (self.num_letters - 1) / 2)
        if abs(mine - theirs) == 1 and abs(argument - boundary) <= bound:
            self.near_ties += 1
            return theirs
        self.mismatches.append((t, n, argument, mine, theirs, abs(argument - boundary), bound))
        return mine

    def letter(self, code: int, t: int, n: int) -> float:
        return self.steps[t, n] * (code - (self.num_letters - 1) / 2)


# ------------------------------------------------------------------------------------------
# The two methods, for one layer.
# ------------------------------------------------------------------------------------------


def gpfq_layer(w, x, x_tilde, letters: Letters, x_abs, x_tilde_abs, chain: int, unit: float):
    """Sequential GPFQ of one layer, neuron by neuron, input by input (the paper's form).

    The bound on the argument, for an engine of unit roundoff ε: the engine forms
    <X~_t, u_{t-1} + w_t X_t> as Σ_{s≤t} H_ts w_s - Σ_{s<t} G_ts q_s from G = X~ᵀX~ and
    H = X~ᵀX; every term passes at most `chain` + m + N0 roundings (the forward passes, the
    sums over rows, the sums over inputs), so its error is at most γ_K times the same sums
    taken over absolute values (|X|, |X~| from the absolute-value network, which bounds the
    forward passes' errors too).
    """
    m, n0 = x.shape
    norms = np.sum(x_tilde * x_tilde, axis=0)
    dead = norms <= 1e-12 * norms.max()  # GPFQ's default dead_tol
    abs_gram, abs_cross = x_tilde_abs.T @ x_tilde_abs, x_tilde_abs.T @ x_abs
    g = gamma(chain + m + n0 + 4, unit)
    q = np.zeros_like(w)
    for n in range(w.shape[1]):
        u = np.zeros(m)
        for t in range(n0):
            v = u + w[t, n] * x[:, t]
            if dead[t]:
                argument, bound = 0.0, 0.0
            else:
                argument = x_tilde[:, t] @ v / norms[t]
                terms = abs_cross[t, : t + 1] @ np.abs(w[: t + 1, n])
                terms += abs_gram[t, :t] @ np.abs(q[:t, n])
                bound = g * (terms / norms[t] + 2 * abs(argument)) + 2 * unit * letters.steps[t, n]
            code = letters.choose(t, n, argument, bound)
            q[t, n] = letters.letter(code, t, n)
            u = v - q[t, n] * x_tilde[:, t]
    return q


def gptq_layer(w, x_tilde, letters: Letters, x_tilde_abs, chain: int, unit: float):
    """GPTQ of one layer, input by input (Frantar et al., Algorithm 1, without lazy batches).

    The bound on the rounding argument w_t (after the updates of inputs s < t), for an engine of
    unit roundoff ε: the engine inverts and factors the damped H, which perturbs U by about
    N0·κ(H)·ε relative to its entries (κ the condition number), and G itself carries the sums'
    error γ_m of |X~|ᵀ|X~|; the argument's error is bounded by that relative error times
    |w_t| + Σ_{s<t} |U_st e_s|, the sizes of the terms that make it. H is damped by
    0.01·mean(diag H), GPTQ's default.
    """
    m, n0 = x_tilde.shape
    h = x_tilde.T @ x_tilde
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w = np.where(dead[:, None], 0.0, w)
    h += 0.01 * np.mean(np.diag(h)) * np.eye(n0)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, H⁻¹ = UᵀU
    abs_gram = x_tilde_abs.T @ x_tilde_abs
    relative = gamma(chain + m, unit) * np.max(abs_gram / np.diag(h)[:, None]) + n0 * unit
    relative *= 4 * np.linalg.cond(h)
    w = w.copy()
    size = np.abs(w)
    q = np.zeros_like(w)
    for t in range(n0):
        for n in range(w.shape[1]):
            code = letters.choose(t, n, w[t, n], (relative + 2 * unit) * size[t, n])
            q[t, n] = letters.letter(code, t, n)
        e = (w[t] - q[t]) / u[t, t]
        w[t + 1 :] -= np.outer(u[t, t + 1 :], e)
        size[t + 1 :] += np.outer(np.abs(u[t, t + 1 :]), np.abs(e))
    return q


# ------------------------------------------------------------------------------------------
# The whole model, layer by layer, and the comparison with the engine.
# ------------------------------------------------------------------------------------------


def reference_codes(layers, params, engine_params, x, *, method, alphabet, unit=U32):
    """Quantizes the model layer by layer in float64, following the engine's letters only at
    near-ties.

    Args:
      layers: the model's layers in call order.
      params: the float parameters, {name: {"kernel", "bias"}}.
      engine_params: the engine's quantized parameters, same layout.
      x: the calibration inputs.
      method: "gpfq" or "gptq".
      alphabet: maps a weight matrix w (N0, N1) to (the step of each weight, number of letters).
      unit: the unit roundoff of the engine's arithmetic (float32 unless x64 is enabled).

    Returns:
      The `Letters` of each layer.
    """
    x_float = x_tilde = np.asarray(x, np.float64)
    x_abs = x_tilde_abs = np.abs(x_float)
    chain, results = 0, []
    for layer in layers:
        kernel = np.asarray(params[layer.name]["kernel"], np.float64)
        bias = np.asarray(params[layer.name]["bias"], np.float64)
        w = kernel.reshape(-1, kernel.shape[-1])
        steps, size = alphabet(w)
        engine_q = np.asarray(engine_params[layer.name]["kernel"]).reshape(w.shape)
        letters = Letters(layer.name, engine_q, steps, size)
        rows, rows_tilde = layer_rows(layer, x_float), layer_rows(layer, x_tilde)
        rows_abs, rows_tilde_abs = layer_rows(layer, x_abs), layer_rows(layer, x_tilde_abs)
        if method == "gpfq":
            q = gpfq_layer(w, rows, rows_tilde, letters, rows_abs, rows_tilde_abs, chain, unit)
        else:
            q = gptq_layer(w, rows_tilde, letters, rows_tilde_abs, chain, unit)
        results.append(letters)
        q = q.reshape(kernel.shape)
        linear = dataclasses.replace(layer, relu=False)  # |.| passes ReLU unchanged
        x_float = layer_output(layer, x_float, kernel, bias)
        x_tilde = layer_output(layer, x_tilde, q, bias)
        x_abs = layer_output(linear, x_abs, np.abs(kernel), np.abs(bias))
        x_tilde_abs = layer_output(linear, x_tilde_abs, np.abs(q), np.abs(bias))
        chain += w.shape[0] + 2
    return results


def assert_engine_equals_reference(layers, params, engine_params, x, *, method, alphabet, unit=U32):
    """The engine's codes are the reference's, up to near-ties (few of them)."""
    results = reference_codes(
        layers, params, engine_params, x, method=method, alphabet=alphabet, unit=unit
    )
    for letters in results:
        assert not letters.mismatches, (
            f"{letters.name}: {len(letters.mismatches)} letters differ from the reference beyond "
            "float32 error; first (t, neuron, argument, reference code, engine code, distance "
            f"to boundary, bound): {letters.mismatches[:5]}"
        )
    total = sum(letters.engine.size for letters in results)
    near_ties = sum(letters.near_ties for letters in results)
    assert near_ties <= MAX_NEAR_TIE_FRACTION * total, (near_ties, total)


def scaled(num_letters: int, *, c: float = 0.8, group_size: int | None = None):
    """The alphabet of `LayerSpec(num_letters=n, c=c, rule="max", group_size=g)`."""

    def alphabet(w):
        return steps_for(w, num_letters=num_letters, c=c, group_size=group_size), num_letters

    return alphabet


def _randomized(variables, key):
    """Random kernels and biases (the biases are zero at init), large enough for the alphabets
    to matter."""
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            0.4 * jax.random.normal(k, leaf.shape, leaf.dtype)
            for k, leaf in zip(keys, leaves, strict=True)
        ],
    )


def _halves(x):
    return [x[: len(x) // 2], x[len(x) // 2 :]]


@pytest.fixture(scope="module")
def mlp():
    x = np.asarray(jax.random.normal(jax.random.key(0), (64, 10)))
    model = MLP()
    variables = _randomized(model.init(jax.random.key(1), x), jax.random.key(2))
    return model, variables, x


@pytest.fixture(scope="module")
def cnn():
    x = np.asarray(jax.random.normal(jax.random.key(3), (24, 7, 7, 2)))
    model = CNN()
    variables = _randomized(model.init(jax.random.key(4), x), jax.random.key(5))
    return model, variables, x


MODELS = {"mlp": MLP_LAYERS, "cnn": CNN_LAYERS}


@pytest.mark.parametrize(
    "method, num_letters, group_size",
    [
        ("gpfq", 4, None),
        ("gpfq", 3, None),
        ("gpfq", 8, 4),
        ("gptq", 4, None),
        ("gptq", 8, None),
        ("gptq", 4, 4),
    ],
)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_codes_equal_the_numpy_reference(request, model_name, method, num_letters, group_size):
    """Per-channel and group-wise alphabets (one step per 4 inputs of a channel)."""
    model, variables, x = request.getfixturevalue(model_name)
    spec = LayerSpec(
        method=method, num_letters=num_letters, c=0.8, rule="max", group_size=group_size
    )
    new, _ = qjax.quantize_model(model, variables, _halves(x), spec=spec, progress=False)
    assert_engine_equals_reference(
        MODELS[model_name],
        variables["params"],
        new["params"],
        x,
        method=method,
        alphabet=scaled(num_letters, group_size=group_size),
    )


@pytest.mark.parametrize("one_pass", [True, False])
def test_fixed_alphabet_equals_the_numpy_reference(cnn, one_pass):
    """A spec holding arrays (a fixed alphabet, which cannot key a compilation cache), in both
    schedules."""
    model, variables, x = cnn
    spec = LayerSpec(alphabet=qjax.alphabets.UniformAlphabet(step=jnp.asarray(0.25), size=4))
    new, _ = qjax.quantize_model(
        model, variables, _halves(x), spec=spec, one_pass=one_pass, progress=False
    )
    assert_engine_equals_reference(
        CNN_LAYERS,
        variables["params"],
        new["params"],
        x,
        method="gpfq",
        alphabet=lambda w: (np.full(w.shape, 0.25), 4),
    )


@pytest.mark.parametrize("method", ["gpfq", "gptq"])
def test_streamed_calibration_and_mesh_equal_the_numpy_reference(cnn, method):
    """Layer by layer: calibration batches from a function (streamed), and statistics summed
    over a device mesh."""
    model, variables, x = cnn
    spec = LayerSpec(method=method, num_letters=4, c=0.8, rule="max")
    runs = [
        qjax.quantize_model(model, variables, lambda: iter(_halves(x)), spec=spec, progress=False),
        qjax.quantize_model(
            model, variables, _halves(x), spec=spec, mesh=qjax.make_mesh(), progress=False
        ),
    ]
    for new, _ in runs:
        assert_engine_equals_reference(
            CNN_LAYERS, variables["params"], new["params"], x, method=method, alphabet=scaled(4)
        )
    with pytest.raises(ValueError, match="schedule=.one_pass. runs on one device"):
        qjax.quantize_model(
            model, variables, x, spec=spec, one_pass=True, mesh=qjax.make_mesh(), progress=False
        )


@pytest.mark.parametrize("method", ["gpfq", "gptq"])
def test_nnx_codes_equal_the_numpy_reference(mlp, method):
    """The MLP as an NNX module, with the Linen model's weights."""
    _, variables, x = mlp
    module = NNXMLP(nnx.Rngs(0))
    for i, linear in enumerate((module.fc0, module.fc1, module.fc2)):
        linear.kernel.set_value(jnp.asarray(variables["params"][f"Dense_{i}"]["kernel"]))
        linear.bias.set_value(jnp.asarray(variables["params"][f"Dense_{i}"]["bias"]))
    spec = LayerSpec(method=method, num_letters=4, c=0.8, rule="max")
    new, _ = qjax.quantize_model(module, _halves(x), spec=spec, progress=False)
    engine = {
        f"Dense_{i}": {"kernel": linear.kernel.get_value()}
        for i, linear in enumerate((new.fc0, new.fc1, new.fc2))
    }
    assert_engine_equals_reference(
        MLP_LAYERS, variables["params"], engine, x, method=method, alphabet=scaled(4)
    )


@pytest.mark.parametrize("method", ["gpfq", "gptq"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_float64_codes_equal_the_numpy_reference(request, model_name, method):
    """With x64 enabled and float64 parameters and inputs, the engine computes in float64: the
    allowed distance to a boundary shrinks to float64 error (≈ 1e-9 of a step for GPTQ, whose
    float32 bound is loose), so its letters are checked exactly."""
    model, variables, x = request.getfixturevalue(model_name)
    spec = LayerSpec(method=method, num_letters=4, c=0.8, rule="max")
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), variables)
        x = np.asarray(x, np.float64)
        new, _ = qjax.quantize_model(model, variables, _halves(x), spec=spec, progress=False)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(new))
    assert_engine_equals_reference(
        MODELS[model_name],
        variables["params"],
        new["params"],
        x,
        method=method,
        alphabet=scaled(4),
        unit=U64,
    )
