"""The paper's recipe as functions of a config, and the per-replica steps: the
optimizer and its schedule, the training state, and the train and eval steps that
:mod:`preact.parallel` maps over devices. The training loop (:mod:`preact.train`) and
the benchmarks (:mod:`preact.bench`) share them."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import dynamic_scale

from preact import data, models, parallel


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # 0 while every step so far was finite; else the first step whose loss or gradients
  # were not, after which the state is frozen: carried on the device, so divergence
  # costs no host sync per step, and no non-finite state is ever applied or saved.
  bad_step: jax.Array
  # float16 only: flax's DynamicScale as arrays {'scale', 'fin_steps'}; None otherwise
  # (and then not in checkpoints, so those of float32 runs keep their structure).
  loss_scale: Any = None


# --------------------------------------------------------------------------------------
# The recipe from a config.


def make_schedule(o: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Step: lr ÷10 at each boundary (32k, 48k), after an optional warm-up at warmup_lr
  (the paper's 0.01 for ~400 iterations); or a cosine decay to zero."""
  if o.schedule == 'cosine':
    main = optax.cosine_decay_schedule(o.lr, max(total_steps - o.warmup_steps, 1))
  else:
    main = optax.piecewise_constant_schedule(
        o.lr, {b - o.warmup_steps: o.decay_factor for b in o.boundaries})
  if not o.warmup_steps:
    return main
  return optax.join_schedules([optax.constant_schedule(o.warmup_lr), main],
                              [o.warmup_steps])


def make_optimizer(o: ml_collections.ConfigDict, total_steps: int):
  """SGD with momentum and L2 weight decay added to the gradient, as Torch's SGD does.

  The authors' code decays every parameter (BN γ, β and biases too); 'weights' decays
  only conv and dense kernels, the common modern choice."""
  mask = None
  if o.decay == 'weights':
    mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key == 'kernel', params)
  return optax.chain(
      optax.add_decayed_weights(o.weight_decay, mask),
      optax.sgd(make_schedule(o, total_steps), momentum=o.momentum, nesterov=o.nesterov))


# --------------------------------------------------------------------------------------
# The per-replica steps.


def init_state(model, tx, seed: int, image_shape, sharding=None) -> TrainState:
  def init():
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init(models.init_key(seed), x, train=False)
    params = variables['params']
    loss_scale = None
    if model.dtype == jnp.float16:  # its range: gradients underflow without scaling
      d = dynamic_scale.DynamicScale()
      loss_scale = {'scale': jnp.float32(d.scale), 'fin_steps': jnp.int32(d.fin_steps)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                      bad_step=jnp.zeros((), jnp.int32), loss_scale=loss_scale)
  return jax.jit(init, out_shardings=sharding)()


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_train_step(model, tx, mean, std, seed: int):
  """(state, batch) → (state, metrics) on one replica; reduces over axis 'batch'."""
  mean, std = np.asarray(mean), np.asarray(std)

  def step(state: TrainState, batch):
    x = data.normalize(batch['image'], mean, std, model.dtype)
    # Dropout masks differ per step and per replica, and repeat on resume.
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), state.step),
                             jax.lax.axis_index(parallel.AXIS))

    def loss_fn(params):
      logits, new = model.apply({'params': params, 'batch_stats': state.batch_stats}, x,
                                train=True, mutable=['batch_stats'], rngs={'dropout': rng})
      return cross_entropy(logits, batch['label']).mean(), (logits, new['batch_stats'])

    if state.loss_scale is None:
      (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params)
      grads = jax.lax.pmean(grads, parallel.AXIS)
      loss_scale, applied = None, jnp.isfinite(optax.tree.norm(grads))
    else:
      # float16: the loss is scaled up before the backward pass and the gradients down
      # after it; a step whose gradients overflow is skipped and the scale halved.
      scaler = dynamic_scale.DynamicScale(**state.loss_scale)
      scaler, applied, (loss, (logits, stats)), grads = scaler.value_and_grad(
          loss_fn, has_aux=True, axis_name=parallel.AXIS)(state.params)
      loss_scale = {'scale': scaler.scale, 'fin_steps': scaler.fin_steps}
    # Statistics are computed per replica (unless BN is cross-replica); their running
    # averages are averaged so that every replica holds the same state.
    stats = jax.lax.pmean(stats, parallel.AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    error = jnp.mean(jnp.argmax(logits, -1) != batch['label'])
    metrics = jax.lax.pmean({'train_loss': loss, 'train_error': error}, parallel.AXIS)
    if loss_scale is not None:
      metrics['loss_scale'] = loss_scale['scale']
    # Every replica sees the same reduced loss and gradients, so all agree on this. A
    # step that loss scaling skipped is not a divergence; a non-finite loss is.
    finite = jnp.isfinite(metrics['train_loss']) & (applied | (loss_scale is not None))
    bad_step = jnp.where(state.bad_step > 0, state.bad_step,
                         jnp.where(finite, 0, state.step + 1)).astype(jnp.int32)
    new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                     batch_stats=stats, opt_state=opt_state, bad_step=bad_step,
                     loss_scale=loss_scale)
    if loss_scale is not None:  # skipped: parameters and momentum stay as they were
      new = new.replace(**jax.tree.map(lambda old, n: jnp.where(applied, n, old),
                                       {'params': state.params, 'opt_state': state.opt_state},
                                       {'params': new.params, 'opt_state': new.opt_state}))
    frozen = jax.tree.map(lambda old, n: jnp.where(bad_step > 0, old, n), state, new)
    return frozen.replace(bad_step=bad_step), metrics

  return step


def make_eval_step(model, mean, std):
  """(state, batch with mask) → summed loss, errors and count over all replicas."""
  mean, std = np.asarray(mean), np.asarray(std)

  def step(state: TrainState, batch):
    x = data.normalize(batch['image'], mean, std, model.dtype)
    logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, x,
                         train=False)
    m, labels = batch['mask'], batch['label']
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    sums = {'loss': jnp.sum(cross_entropy(logits, labels) * m),
            'errors': jnp.sum((jnp.argmax(logits, -1) != labels) * m),
            'errors_top5': jnp.sum(~jnp.any(top5 == labels[:, None], -1) * m),
            'examples': jnp.sum(m)}
    return jax.lax.psum(sums, parallel.AXIS)

  return step
