"""One process of tests/test_multihost.py: a tiny data-parallel study through fqjax.study.runner.run.

  python tests/multihost_worker.py multi <process_id> <num_processes> <port> <workdir> <out.json>
  python tests/multihost_worker.py single <devices> <workdir> <out.json>

"multi": <num_processes> processes on localhost, 4 simulated CPU devices each, joined by
jax.distributed (config.distributed, as launch.py does) with gloo CPU collectives. It first checks a
psum across the processes; without working cross-process CPU collectives it exits with NO_COLLECTIVES_EXIT.
"single": one process with <devices> simulated CPU devices (the reference run).
Each writes {"process_index", "process_count", "device_count", "wrote" (basenames of the files it wrote
through fqjax.outputs.results' writers), "metrics"} to <out.json>.
"""
import json
import os
import sys

NO_COLLECTIVES_EXIT = 3
LOCAL_DEVICES = 4


def _set_env(devices: int) -> None:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  os.environ["JAX_PLATFORMS"] = "cpu"


def tiny_config():
  """tests/conftest.py's tiny study, cut to train + ptq (32, 4) with batches that split over 8 devices."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from studies import tiny_study_config  # noqa: E402 (the XLA flags come with the environment the test passes)
  c = tiny_study_config()
  c.seeds = (0,)
  c.train.epochs = 1
  c.train.batch_size = 32
  c.ptq.bit_widths = (32, 4)
  c.eval.bootstrap_resamples = 0
  c.tensorboard = False
  c.parallel.data_parallel = True
  return c


def metrics(res: dict) -> dict:
  """The numbers the test compares, per seed: the trained model's test accuracy and loss, the final
  training loss, and each PTQ bit width's test accuracy and loss."""
  out = {}
  for seed, entry in res["train"]["per_seed"].items():
    out[f"train/{seed}/test_accuracy"] = entry["test"]["accuracy"]
    out[f"train/{seed}/test_loss"] = entry["test"]["loss"]
    out[f"train/{seed}/variables_digest"] = entry["variables_digest"]
  for seed, entry in res["ptq"]["per_seed"].items():
    for bits, e in entry.items():
      out[f"ptq/{seed}/{bits}/accuracy"] = e["accuracy"]
      out[f"ptq/{seed}/{bits}/loss"] = e["loss"]
  return out


def main(argv):
  mode = argv[1]
  if mode == "multi":
    pid, nproc, port, workdir, out = int(argv[2]), int(argv[3]), int(argv[4]), argv[5], argv[6]
    _set_env(LOCAL_DEVICES)
  else:
    devices, workdir, out = int(argv[2]), argv[3], argv[4]
    _set_env(devices)

  import jax
  import numpy as np
  from fqjax.training import parallel
  from fqjax.outputs import results
  from fqjax.study import runner

  wrote = []  # the basenames of the files this process writes through fqjax.outputs.results' writers

  def recording(write):
    def wrapper(path, *args, **kwargs):
      wrote.append(os.path.basename(path))
      return write(path, *args, **kwargs)
    return wrapper
  for name in ("write_json", "write_csv", "atomic_write_text"):
    setattr(results, name, recording(getattr(results, name)))

  config = tiny_config()
  if mode == "multi":
    config.distributed.initialize = True
    config.distributed.coordinator_address = f"localhost:{port}"
    config.distributed.num_processes = nproc
    config.distributed.process_id = pid
    try:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception as e:  # noqa: BLE001
      print(f"NO_COLLECTIVES: no gloo CPU collectives in this jax: {type(e).__name__}: {e}", flush=True)
      sys.exit(NO_COLLECTIVES_EXIT)
    parallel.maybe_initialize_distributed(config.distributed)
    try:  # a first psum across the processes: does this platform have multi-process CPU collectives?
      mesh = parallel.data_mesh()
      ones = parallel.global_array(np.ones((mesh.size,), np.float32), parallel.batch_sharding(mesh))
      total = jax.jit(lambda a: a.sum(), out_shardings=parallel.replicated(mesh))(ones)
      total = float(np.asarray(total.addressable_data(0)))
      if jax.process_count() != nproc or total != mesh.size:
        raise RuntimeError(f"process_count {jax.process_count()}, psum {total} (expected {nproc}, {mesh.size})")
    except Exception as e:  # noqa: BLE001 (any failure here means: no usable cross-process collectives)
      print(f"NO_COLLECTIVES: {type(e).__name__}: {e}", flush=True)
      sys.exit(NO_COLLECTIVES_EXIT)
  print(f"worker: {parallel.describe()}", flush=True)

  res = runner.run(config, workdir, ["train", "ptq"], progress=False)
  with open(out, "w") as f:
    json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
               "device_count": jax.device_count(), "wrote": sorted(set(wrote)), "metrics": metrics(res)}, f)
  if mode == "multi":
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
