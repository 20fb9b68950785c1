"""Tests of the optax ProxQuant transform, the BinaryConnect helpers and path masks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qjax import prox, transforms


def tree_allclose(a, b, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol), a, b)


PARAMS = {
    "dense": {"kernel": jnp.linspace(-1.5, 1.5, 12).reshape(3, 4), "bias": jnp.ones(4) * 0.3},
    "conv": {"kernel": jnp.linspace(-0.7, 0.9, 8).reshape(1, 2, 1, 4)},
}
GRADS = jax.tree.map(lambda p: jnp.cos(3 * p) + 0.1, PARAMS)


def test_params_plus_updates_is_the_prox_of_the_inner_step():
    inner = optax.adam(0.05)
    tx = optax.chain(inner, transforms.prox_quant(0.2, prox.binary_quantizer("one")))
    updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    inner_updates, _ = inner.update(GRADS, inner.init(PARAMS), PARAMS)
    expected = jax.tree.map(lambda p, u: prox.binary_prox(p + u, 0.2), PARAMS, inner_updates)
    tree_allclose(optax.apply_updates(PARAMS, updates), expected)


def test_schedule_is_evaluated_at_the_step_count():
    seen = []
    tx = transforms.prox_quant(lambda count: (seen.append(count), 0.1 * count)[1], "ternary")
    state = tx.init(PARAMS)
    params = PARAMS
    for step in range(3):
        updates, state = tx.update(GRADS, state, params)
        expected = jax.tree.map(
            lambda p, g, s=step: prox.ternary_prox(p + g, 0.1 * s), params, GRADS
        )
        params = optax.apply_updates(params, updates)
        tree_allclose(params, expected, atol=1e-5)
    assert [int(c) for c in seen] == [0, 1, 2] and int(state.count) == 3


def test_clip_bounds_the_weights():
    big = jax.tree.map(lambda g: 10 * g, GRADS)
    tx = transforms.prox_quant(0.01, "binary", clip=1.0)
    updates, _ = tx.update(big, tx.init(PARAMS), PARAMS)
    new = optax.apply_updates(PARAMS, updates)
    assert all(float(jnp.max(jnp.abs(leaf))) <= 1.0 for leaf in jax.tree.leaves(new))


def test_binary_by_name_pulls_toward_the_mean_magnitude():
    tx = transforms.prox_quant(1e6, "binary")
    new = optax.apply_updates(PARAMS, tx.update(GRADS, tx.init(PARAMS), PARAMS)[0])
    for theta, q in zip(
        jax.tree.leaves(optax.apply_updates(PARAMS, GRADS)), jax.tree.leaves(new), strict=True
    ):
        np.testing.assert_allclose(q, jnp.mean(jnp.abs(theta)) * jnp.sign(theta), rtol=1e-5)


def test_needs_params():
    tx = transforms.prox_quant(0.1)
    with pytest.raises(ValueError, match="params"):
        tx.update(GRADS, tx.init(PARAMS))


def test_mask_leaves_other_updates_unchanged_and_keeps_structure():
    mask = transforms.mask_by_path()
    assert mask(PARAMS) == {"dense": {"kernel": True, "bias": False}, "conv": {"kernel": True}}
    tx = transforms.prox_quant(0.3, prox.binary_quantizer("one"), mask=mask)
    updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)
    np.testing.assert_array_equal(updates["dense"]["bias"], GRADS["dense"]["bias"])
    np.testing.assert_allclose(
        PARAMS["conv"]["kernel"] + updates["conv"]["kernel"],
        prox.binary_prox(PARAMS["conv"]["kernel"] + GRADS["conv"]["kernel"], 0.3),
        atol=1e-6,
    )


def test_mask_by_path_exclude():
    mask = transforms.mask_by_path(exclude=["conv/.*"])
    assert mask(PARAMS) == {"dense": {"kernel": True, "bias": False}, "conv": {"kernel": False}}


def test_mask_with_wrong_structure_raises():
    with pytest.raises(ValueError, match="mask"):
        transforms.hard_quantize(PARAMS, mask={"dense": True})


def test_inject_hyperparams_controls_the_strength():
    tx = optax.inject_hyperparams(transforms.prox_quant)(reg_schedule=0.0, quantizer="binary")
    state = tx.init(PARAMS)
    updates, state = tx.update(GRADS, state, PARAMS)
    tree_allclose(updates, GRADS)  # λ = 0: identity prox
    state.hyperparams["reg_schedule"] = jnp.asarray(1e6)
    updates, _ = jax.jit(tx.update)(GRADS, state, PARAMS)
    hard = jax.tree.map(prox.get_quantizer("binary").project, optax.apply_updates(PARAMS, GRADS))
    tree_allclose(optax.apply_updates(PARAMS, updates), hard)


def test_linear_reg_schedule_grows_per_epoch_or_per_step():
    per_epoch = transforms.linear_reg_schedule(learning_rate=0.01, reg=1e-4, steps_per_epoch=50)
    per_step = transforms.linear_reg_schedule(
        learning_rate=0.01, reg=1e-4, steps_per_epoch=50, growth="step"
    )
    # The authors' λ_t = λ·epoch: zero in the first epoch, constant within each epoch.
    np.testing.assert_allclose(
        [per_epoch(t) for t in (0, 49, 50, 99, 125)], [0, 0, 1e-6, 1e-6, 2e-6]
    )
    np.testing.assert_allclose([per_step(t) for t in (0, 25, 125)], [0, 5e-7, 2.5e-6])
    assert float(jax.jit(per_epoch)(jnp.int32(120))) == pytest.approx(2e-6)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        transforms.linear_reg_schedule(learning_rate=0.01, reg=1e-4, steps_per_epoch=0)
    with pytest.raises(ValueError, match="growth"):
        transforms.linear_reg_schedule(learning_rate=0.01, reg=1e-4, steps_per_epoch=5, growth="x")


@pytest.mark.parametrize("growth", ["epoch", "step"])
def test_total_pull_sums_the_schedule_and_reg_for_total_pull_inverts_it(growth):
    kwargs = {"learning_rate": 0.02, "steps_per_epoch": 7, "growth": growth}
    schedule = transforms.linear_reg_schedule(reg=0.3, **kwargs)
    summed = sum(schedule(t) for t in range(7 * 5))
    assert transforms.total_pull(reg=0.3, epochs=5, **kwargs) == pytest.approx(summed)
    assert transforms.reg_for_total_pull(summed, epochs=5, **kwargs) == pytest.approx(0.3)
    # The paper's CIFAR run (200 epochs of 390 steps, λ = 1e-4): a total pull of 7.76.
    paper = transforms.total_pull(learning_rate=0.01, reg=1e-4, steps_per_epoch=390, epochs=200)
    assert paper == pytest.approx(7.761)
    with pytest.raises(ValueError, match="no pull"):
        transforms.reg_for_total_pull(1.0, learning_rate=0.01, steps_per_epoch=5, epochs=1)


def test_straight_through_forward_is_quantized_and_gradient_passes():
    w = jnp.array([0.3, -0.2, 1.7])

    def loss(w):
        q = transforms.straight_through({"kernel": w}, prox.binary_quantizer("one"))["kernel"]
        return jnp.sum(q * jnp.array([1.0, 2.0, 3.0])), q

    (value, q), grad = jax.value_and_grad(loss, has_aux=True)(w)
    np.testing.assert_array_equal(q, [1.0, -1.0, 1.0])
    assert value == 2.0
    np.testing.assert_array_equal(grad, [1.0, 2.0, 3.0])


U32 = 2.0**-24  # float32 unit roundoff
LEARNING_RATE, STEPS = 1e-2, 300
# Adam's step is at most (1 − β1)/√(1 − β2)·η per coordinate (the bound of Kingma & Ba, §2.1).
ADAM_MAX_STEP = (1 - 0.9) / np.sqrt(1 - 0.999) * LEARNING_RATE


def _binary_tolerance(params, mask):
    """Binary weights all on ±α (α = mean|θ| of the weights they came from) are measured against
    α' = fl(mean|±α|): the error |α − α'| is the float32 error of a mean over the leaf's N
    entries, at most γ_N·α, γ_N = N·u / (1 − N·u). (In training, once λ_t exceeds the distance
    to {±α}, here λ_t ≫ Adam's step, the prox puts each entry exactly on ±α.)"""
    leaves = [p for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if m]
    return max(p.size * U32 / (1 - p.size * U32) * float(jnp.max(jnp.abs(p))) for p in leaves)


def _ternary_tolerance(growth):
    """Ternary: the pull (θ + λ_t T(θ)) / (1 + λ_t) leaves a distance d with d ≤ (d + s)/(1 + λ_t)
    after each Adam step of size s, so d ≤ s/λ_t at the end (λ_T = growth·(T − 1)); hence the
    faster growth than for the binary prox."""
    return ADAM_MAX_STEP / (growth * (STEPS - 1))


def test_clip_params_and_hard_quantize():
    tx = transforms.clip_params(1.0, mask=transforms.mask_by_path())
    grads = jax.tree.map(lambda g: 5 * g, GRADS)
    new = optax.apply_updates(PARAMS, tx.update(grads, tx.init(PARAMS), PARAMS)[0])
    assert float(jnp.max(jnp.abs(new["dense"]["kernel"]))) <= 1.0
    np.testing.assert_allclose(
        new["dense"]["bias"], PARAMS["dense"]["bias"] + grads["dense"]["bias"]
    )
    hard = transforms.hard_quantize(PARAMS, "binary", mask=transforms.mask_by_path())
    kernel = PARAMS["dense"]["kernel"]
    np.testing.assert_allclose(jnp.abs(hard["dense"]["kernel"]), jnp.mean(jnp.abs(kernel)))
    np.testing.assert_array_equal(hard["dense"]["bias"], PARAMS["dense"]["bias"])
    mask = transforms.mask_by_path()
    tolerance = _binary_tolerance(hard, mask(hard))
    assert float(transforms.quantization_error(hard, mask=mask)) <= tolerance
    with pytest.raises(ValueError, match="bound"):
        transforms.clip_params(0.0)


class SmallNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(3)(x)


def blobs(key, n=600):
    centers = 2.0 * jax.random.normal(jax.random.key(42), (3, 10))
    labels = jax.random.randint(key, (n,), 0, 3)
    x = centers[labels] + jax.random.normal(jax.random.fold_in(key, 1), (n, 10))
    return x, labels


def accuracy(params, x, y):
    return float(jnp.mean(jnp.argmax(SmallNet().apply(params, x), -1) == y))


@pytest.mark.parametrize(("quantizer", "growth"), [("binary", 1e-3), ("ternary", 0.1)])
def test_chain_drives_a_model_onto_the_quantized_set(quantizer, growth):
    model = SmallNet()
    x, y = blobs(jax.random.key(0))
    x_test, y_test = blobs(jax.random.key(1))
    params = model.init(jax.random.key(2), x[:1])

    def loss_fn(params):
        logits = model.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    warm = optax.adam(1e-2)
    state = warm.init(params)
    for _ in range(100):
        updates, state = warm.update(jax.grad(loss_fn)(params), state, params)
        params = optax.apply_updates(params, updates)
    float_accuracy = accuracy(params, x_test, y_test)

    mask = transforms.mask_by_path()
    tx = optax.chain(
        optax.adam(LEARNING_RATE),
        transforms.prox_quant(lambda t: growth * t, quantizer, clip=1.0, mask=mask),
    )

    @jax.jit
    def train_step(params, state):
        updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(STEPS):
        params, state = train_step(params, state)
    assert train_step._cache_size() == 1  # the jitted step compiled once
    if quantizer == "binary":
        tolerance = _binary_tolerance(params, mask(params))
    else:
        tolerance = _ternary_tolerance(growth)
    assert float(transforms.quantization_error(params, quantizer, mask=mask)) <= tolerance
    hard = transforms.hard_quantize(params, quantizer, mask=mask)
    assert abs(accuracy(hard, x_test, y_test) - accuracy(params, x_test, y_test)) <= 0.01
    assert accuracy(hard, x_test, y_test) >= float_accuracy - 0.05
