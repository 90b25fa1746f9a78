"""The train state, its sharded creation (abstract first, shardings from the encoder's rules, then built in
place: never a full unsharded copy), and the pure train and eval steps, jitted with explicit shardings."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flaxclf.data.packing import per_text, segments
from flaxclf.models.classifier import init_params
from flaxclf.models.interface import Classifier
from flaxclf.nn import lora
from flaxclf.runtime import sharding
from flaxclf.training import losses

BATCH_AXES = ("data", "fsdp")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # the run's base dropout key; step keys are fold_in(rng, step)


def abstract_state(model: Classifier, tx: optax.GradientTransformation, param_dtype: Any) -> TrainState:
    """Shapes and dtypes of the whole state, with no memory allocated. The optimizer state covers the trained
    variables alone (with a LoRA adapter: its matrices and the head; flaxclf.nn.lora)."""
    def init() -> TrainState:
        params = init_params(model, jax.random.PRNGKey(0), param_dtype)
        trained, _ = lora.split(params, model.config.lora)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(trained), jax.random.PRNGKey(0))
    return jax.eval_shape(init)


def saved(state: TrainState, model: Classifier) -> TrainState:
    """What a checkpoint holds of a state (or of its shapes or shardings): all of it, except a LoRA run's frozen
    variables, which come from the base model (model.name) again."""
    return state.replace(params=lora.split(state.params, model.config.lora)[0])


def place_frozen(host: dict, shardings: Any, spec: lora.LoraSpec | None) -> dict:
    """A LoRA model's frozen variables, from the host's whole tree (the base's, read again) onto their shardings;
    an empty dict without LoRA."""
    return {} if spec is None else place(lora.split(host, spec)[1], lora.split(shardings, spec)[1])


def with_frozen(state: TrainState, frozen: dict) -> TrainState:
    """A restored checkpoint's state made whole with the frozen variables (an empty dict without LoRA)."""
    return state.replace(params=lora.merge(state.params, frozen))


def state_shardings(abstract: TrainState, mesh: Mesh, model: Classifier) -> TrainState:
    """Every leaf's NamedSharding from the model's encoder's rules (optimizer moments follow their params)."""
    return sharding.tree_shardings(abstract, mesh, model.config.encoder.sharding_rules)


def place(host_tree: Any, shardings: Any) -> Any:
    """Host numpy leaves -> global arrays on their shardings; each device receives only its own shard, and
    each process reads only the slices its devices hold, so no full copy is ever made on a device."""
    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.tree.map(put, host_tree, shardings)


def create_state(host_params: dict, tx: optax.GradientTransformation, shardings: TrainState,
                 seed: int, spec: lora.LoraSpec | None = None) -> TrainState:
    """The initial state directly on its shardings: pretrained params placed, optimizer state built in place."""
    params = place(host_params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(lora.split(params, spec)[0])
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    rng = jax.device_put(jax.random.PRNGKey(seed), shardings.rng)
    return TrainState(step, params, opt_state, rng)


def _micro_batches(batch: dict, k: int, mesh: Mesh) -> dict:
    """[B, ...] -> [k, B/k, ...] taking rows i, i+k, i+2k, ... for micro-batch i, so that every micro-batch
    is spread over all batch shards like the full batch is (a contiguous split would move data)."""
    spec = NamedSharding(mesh, P(None, BATCH_AXES))

    def split(x):
        x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, spec)
    return jax.tree.map(split, batch)


def logits(params: Any, batch: dict, model: Classifier, **kwargs: Any) -> jax.Array:
    """The model's float32 logits, one row per text slot of the batch: [N, C]."""
    z = model.apply(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                    segments=segments(batch), **kwargs)
    return per_text(z, batch)


def train_step(state: TrainState, batch: dict, *, model: Classifier, tx: optax.GradientTransformation,
               loss_spec: losses.LossSpec | str, accum_steps: int, mesh: Mesh) -> tuple[TrainState, dict]:
    """One optimizer step on one global batch (padded or packed), split into `accum_steps` micro-batches whose
    summed gradients equal the full batch's (each micro-loss divides by the whole batch's denominator, class
    weights included)."""
    key = jax.random.fold_in(state.rng, state.step)
    denominator = losses.batch_denominator(loss_spec, per_text(batch["labels"], batch),
                                           per_text(batch["weight"], batch))

    # Only the trained variables are differentiated: no gradient (no weight-gradient matmul, no embedding
    # scatter) is computed for a LoRA run's frozen weights.
    trained, frozen = lora.split(state.params, model.config.lora)

    def loss_fn(trained, micro, micro_key):
        z = logits(lora.merge(trained, frozen), micro, model, deterministic=False, rngs={"dropout": micro_key})
        return losses.loss(loss_spec, z, per_text(micro["labels"], micro), per_text(micro["weight"], micro),
                           denominator)

    grad_fn = jax.value_and_grad(loss_fn)
    if accum_steps == 1:
        loss, grads = grad_fn(trained, batch, key)
    else:
        def body(carry, xs):
            i, micro = xs
            loss_g = grad_fn(trained, micro, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, loss_g), None
        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trained))
        micro = _micro_batches(batch, accum_steps, mesh)
        (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
    updates, opt_state = tx.update(grads, state.opt_state, trained)
    params = lora.merge(optax.apply_updates(trained, updates), frozen)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "examples": batch["weight"].sum()}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict, *, model: Classifier) -> jax.Array:
    """Logits of one evaluation batch (dropout off), float32 [N, C]: one per text slot (per_text)."""
    return logits(params, batch, model)


def compile_steps(model: Classifier, tx: optax.GradientTransformation, loss_spec: losses.LossSpec | str,
                  accum_steps: int, mesh: Mesh, shardings: TrainState) -> tuple[Callable, Callable]:
    """train_step and eval_step under jax.jit with explicit shardings; the state is donated. `loss_spec`: a
    LossSpec, or a plain problem type for PyTorch's loss with no weights."""
    batch_s = sharding.batch_sharding(mesh)
    train = jax.jit(
        functools.partial(train_step, model=model, tx=tx, loss_spec=loss_spec, accum_steps=accum_steps,
                          mesh=mesh),
        in_shardings=(shardings, batch_s), out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0)
    evaluate = jax.jit(functools.partial(eval_step, model=model), in_shardings=(shardings.params, batch_s),
                       out_shardings=batch_s)
    return train, evaluate
