"""Time of a ResNet-20 training step with ProxQuant over the same step with plain Adam.

    python -m benchmarks.proxquant_step [--batch_size=128] [--repeats=10]

Both steps are jitted with the same model, batch and Adam; the ProxQuant one appends
`qjax.prox_quant` (binary ±1 and ternary, each clipped to [−1, 1] as in the authors' code) as the
last link of the chain, with the paper's masks. Steps are timed interleaved (one of each in
turn) and the medians compared, in one run. Target: ratio ≤ 1.10.
"""

import time

import jax
import numpy as np
import optax
from absl import app, flags

import qjax
from qjax.models import resnet

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 128, "Images per step (the paper's batch size is 128).")
flags.DEFINE_integer("repeats", 10, "Timed steps of each kind.")


def make_step(model, tx):
    @jax.jit
    def step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            logits, mutated = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, mutated["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step


def main(argv):
    del argv
    model = resnet.ResNet20()
    key_images, key_labels, key_init = jax.random.split(jax.random.key(0), 3)
    images = jax.random.normal(key_images, (FLAGS.batch_size, 32, 32, 3))
    labels = jax.random.randint(key_labels, (FLAGS.batch_size,), 0, 10)
    variables = model.init(key_init, images[:1], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    schedule = qjax.linear_reg_schedule(learning_rate=0.01, reg=1e-4, steps_per_epoch=390)
    binary_mask = qjax.mask_by_path(r".*/kernel", exclude=[".*shortcut.*"])
    ternary_mask = qjax.mask_by_path(
        r".*/kernel", exclude=[".*shortcut.*", "conv_init/.*", "head/.*"]
    )
    optimizers = {
        "adam": optax.adam(0.01),
        "adam + prox_quant binary": optax.chain(
            optax.adam(0.01),
            qjax.prox_quant(
                schedule, qjax.prox.binary_quantizer("one"), clip=1.0, mask=binary_mask
            ),
        ),
        "adam + prox_quant ternary": optax.chain(
            optax.adam(0.01), qjax.prox_quant(schedule, "ternary", clip=1.0, mask=ternary_mask)
        ),
    }
    runs = {}
    for name, tx in optimizers.items():
        step = make_step(model, tx)
        state = (params, batch_stats, tx.init(params))
        jax.block_until_ready(step(*state, images, labels))  # compile
        runs[name] = (step, state)
    times = {name: [] for name in optimizers}
    for _ in range(FLAGS.repeats):
        for name, (step, state) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(step(*state, images, labels))
            times[name].append(time.perf_counter() - start)
    base = np.median(times["adam"])
    print(
        f"ResNet-20 train step, batch {FLAGS.batch_size}, {jax.devices()[0].platform}, "
        f"median of {FLAGS.repeats}:"
    )
    for name, seconds in times.items():
        median = np.median(seconds)
        print(f"  {name:28s} {median * 1e3:8.1f} ms   ratio {median / base:.3f}")
    print("target: ratio <= 1.10")


if __name__ == "__main__":
    app.run(main)
