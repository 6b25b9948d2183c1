"""Meshes, parameter sharding rules, batch placement and the start-up memory check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nextaccel_jax import sharding
from nextaccel_jax.stages import common


def test_mesh_axes_and_errors():
  mesh = sharding.make_mesh()
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
  mesh = sharding.make_mesh((("data", 2), ("fsdp", -1)))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert sharding.batch_axes(mesh) == ("data", "fsdp") and sharding.batch_divisor(mesh) == 8
  assert sharding.data_sharding(mesh).spec == P(("data", "fsdp"))
  one = sharding.make_mesh((("data", 1),), devices=jax.devices()[:1])
  assert sharding.data_sharding(one).spec == P("data")
  for bad in ((("data", 3),), (("data", -1), ("fsdp", -1)), (("data", 4), ("data", 2))):
    with pytest.raises(ValueError, match="mesh axes"):
      sharding.make_mesh(bad)


def test_fsdp_rule_shards_the_largest_divisible_dimension():
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
  spec = lambda shape, **kw: sharding.leaf_spec("params/x/kernel", shape, mesh, **kw)
  assert spec((3, 3, 16, 64), fsdp_min_size=0) == P(None, None, None, "fsdp")
  assert spec((512, 6), fsdp_min_size=0) == P("fsdp", None)
  # Nothing divisible, too small, or a scalar: replicated.
  assert spec((3, 5), fsdp_min_size=0) == P()
  assert spec((64, 64), fsdp_min_size=64 * 64 + 1) == P()
  assert spec((), fsdp_min_size=0) == P()
  # With fsdp = 1 every rule is replication: plain data parallelism.
  dp = sharding.make_mesh()
  assert sharding.leaf_spec("a", (1024, 1024), dp, fsdp_min_size=0) == P()


def test_rules_first_match_explicit_specs_and_errors():
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
  rules = ((r"embedding$", "replicated"), (r"head/kernel$", (None, "data")), (".*", "fsdp"))
  tree = {
    "params": {
      "tok": {"embedding": np.zeros((64, 32))},
      "head": {"kernel": np.zeros((32, 64))},
      "mlp": {"kernel": np.zeros((32, 64))},
    },
    "step": np.zeros((), np.int32),
  }
  out = sharding.tree_shardings(tree, mesh, rules=rules, fsdp_min_size=0)
  assert out["params"]["tok"]["embedding"].spec == P()
  assert out["params"]["head"]["kernel"].spec == P(None, "data")
  assert out["params"]["mlp"]["kernel"].spec == P(None, "fsdp")
  assert out["step"].spec == P()
  assert sharding.describe(out) == {"P()": 2, "P(None, 'data')": 1, "P(None, 'fsdp')": 1}
  with pytest.raises(ValueError, match="no mesh axis 'model'"):
    sharding.tree_shardings(tree, mesh, rules=((".*kernel", (None, "model")),))
  with pytest.raises(ValueError, match="cannot split a dimension of 6"):
    sharding.tree_shardings({"odd": np.zeros((6, 8))}, mesh, rules=(("odd", ("fsdp", None)),))
  with pytest.raises(ValueError, match="not a valid regex"):
    sharding.tree_shardings(tree, mesh, rules=(("(", "fsdp"),))
  with pytest.raises(ValueError, match="spec 'zero'"):
    sharding.tree_shardings(tree, mesh, rules=((".*", "zero"),))


def test_place_and_to_host_round_trip():
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
  tree = {"w": np.arange(64 * 8, dtype=np.float32).reshape(64, 8)}
  placed = sharding.place(tree, mesh)
  # Below the default threshold: replicated.
  assert placed["w"].sharding.spec == P()
  batch = sharding.global_batch({"x": np.arange(16.0)}, mesh)
  assert batch["x"].sharding == sharding.data_sharding(mesh)
  np.testing.assert_array_equal(sharding.to_host(batch)["x"], np.arange(16.0))
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    sharding.per_process_batch(12, mesh)


def test_compile_train_step_reports_memory_and_stops_when_it_cannot_fit(capsys):
  mesh = sharding.make_mesh()
  data = sharding.data_sharding(mesh)
  step = jax.jit(lambda s, b: (s + b.sum(), {"loss": b.mean()}), donate_argnums=0)
  args = (
    jnp.zeros((256, 256)),
    jax.ShapeDtypeStruct((8, 256), jnp.float32, sharding=data),
  )
  compiled = common.compile_train_step(step, args, name="toy", memory={"limit_gib": 1.0})
  line = capsys.readouterr().out
  assert "toy: train step compiled in" in line and "MiB) per device of 1.00 GiB" in line
  mem = common.step_memory(compiled)
  assert mem.arguments >= 256 * 256 * 4 and mem.total > 0
  _, m = compiled(jnp.zeros((256, 256)), jnp.ones((8, 256), jnp.float32))
  assert float(m["loss"]) == 1.0
  with pytest.raises(common.StepMemoryError, match="toy: the train step needs .* fsdp"):
    common.compile_train_step(step, args, name="toy", memory={"limit_gib": 1e-6})
  # Checking off: the same budget only prints.
  common.compile_train_step(step, args, name="toy", memory={"limit_gib": 1e-6, "check": False})
