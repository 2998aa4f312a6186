"""The command line as a user runs it: end to end, clear errors, SIGTERM and resume."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mae_jax import config_check, errors
from mae_jax.runtime import host

from conftest import REPO, tiny_config
from conftest import run_cli as _cli

CONFIGS = sorted(glob.glob(str(REPO / "configs" / "*.py")))
CONFIGS = [c for c in CONFIGS if not c.endswith("__init__.py")]


def test_cli_end_to_end(cifar_folder, tmp_path):
  out = _cli(tmp_path, "--config.max_steps=20", "--config.checkpoint_every_steps=10",
             "--config.figure_every_steps=10", folder=cifar_folder)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "step 20/20 | 1,280 images |" in out.stdout and "img/s" in out.stdout and "ETA" in out.stdout
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [10, 20] and all("loss" in r and "lr" in r for r in rows)
  assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  assert os.path.exists(tmp_path / "figures" / "reconstruction_00000010.png")
  assert os.path.exists(tmp_path / "figures" / "reconstruction_00000020.png")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]
  assert json.load(open(tmp_path / "config.json"))["model"]["patch_size"] == 4

  # The same command with more steps resumes from step 20.
  out = _cli(tmp_path, "--config.max_steps=30", "--config.checkpoint_every_steps=10",
             "--config.figure_every_steps=10", folder=cifar_folder)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from" in out.stdout and "step 30/30" in out.stdout
  assert "step 10/30" not in out.stdout

  # A different model in the same workdir: a clear error, and the checkpoints stay.
  out = _cli(tmp_path, "--config.model.encoder_width=128", folder=cifar_folder)
  assert out.returncode == 2
  assert "different model" in out.stderr and "encoder_width: checkpoint 64 vs config 128" in out.stderr
  assert "Traceback" not in out.stderr
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20", "30"]


def _stderr_lines(out) -> list:
  """The lines a job wrote to stderr, without those the CUDA plugin (in the dev extra, to compile
  for GPUs) prints when JAX is imported on a machine without a GPU."""
  noise = ("cudart_stub.cc", "All log messages before absl::InitializeLog()")
  return [l for l in out.stderr.strip().splitlines() if not any(n in l for n in noise)]


def _assert_user_error(out, message):
  """A user mistake: exit 2, one line on stderr naming the problem, no traceback."""
  assert out.returncode == 2, out.stderr[-2000:]
  assert message in out.stderr, out.stderr[-2000:]
  assert len(_stderr_lines(out)) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_the_metric_writer_leaves_torch_unimported(tmp_path):
  """Where PyTorch is installed tensorboardX imports it (1.5-2.6 s of every run's start on 2
  cores); the writer imports tensorboardX without it, and torch stays importable afterwards."""
  code = ("import sys\nfrom mae_jax.io import metrics\n"
          "w = metrics.MetricWriter(sys.argv[1], enabled=True)\nw.write(3, {'loss': 1.5})\nw.close()\n"
          "print('torch' in sys.modules)\nimport torch\nprint(torch.ones(2).sum().item())\n")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["False", "2.0"]
  row = json.loads(open(tmp_path / "metrics.jsonl").readline())
  assert row.pop("wall_time") > 0 and row == {"step": 3, "loss": 1.5}
  assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))


@pytest.mark.parametrize("override, message", [
    ("--config.dataset.image_size=30", "not divisible by model.patch_size"),
    ("--config.model.mask_ratio=1.0", "model.mask_ratio=1.0 must be in [0, 1)"),
    ("--config.grad_accum_steps=5", "batch_size=64 is not divisible by grad_accum_steps=5"),
    ("--config.dataset.name=mnist_typo", "unknown dataset.name='mnist_typo'"),
    ("--config.dataset.folder=/nonexistent/cifar", "does not exist"),
    ("--config.batch_size=0", "batch_size=0 must be >= 1"),
    ("--config.model.encoder_depth=0", "model.encoder_depth=0 must be >= 1"),
    ("--config.model.decoder_depth=0", "model.decoder_depth=0 must be >= 1"),
    ("--config.model.encoder_heads=0", "model.encoder_heads=0 must be >= 1"),
    ("--config.finetune.drop_path=1.5", "finetune.drop_path=1.5 must be in [0, 1)"),
    ("--config.max_steps=-1", "max_steps=-1 must be >= 0"),
    ("--config.model.nonexistent=1", "unknown config field 'model.nonexistent'"),
    ("--config.model.encoder_dept=3", "did you mean model.encoder_depth"),
    ("--config.modl.mask_ratio=0.5", "unknown config field 'modl.mask_ratio' (--config.modl.mask_ratio); did you mean model?"),
    ("--config.model.mask_ratio=abc", "--config.model.mask_ratio=abc: could not convert string to float"),
])
def test_cli_bad_config_errors(tmp_path, override, message):
  out = _cli(tmp_path / "w", "--config.dataset.source=folder", "--config.dataset.folder=/tmp", override)
  _assert_user_error(out, message)
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("config, message", [
    ("configs/nope.py", "config file"),
    ("configs/cifar10_vit_t.py:huge", "unknown config argument 'huge'; use no argument or words of tiny, official_eval"),
])
def test_cli_bad_config_file_errors(tmp_path, config, message):
  out = _cli(tmp_path / "w", config=config)
  _assert_user_error(out, message)
  if config == "configs/nope.py":
    assert "nope.py' does not exist" in out.stderr


def test_sweep_of_a_config_that_is_no_study(tmp_path):
  out = _cli(tmp_path / "w", module="mae_jax.sweep")
  _assert_user_error(out, "--config is not a study (it has no 'sweep' section)")


def test_cli_unusable_workdir_errors(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("not a folder")
  out = _cli(afile, "--config.dataset.source=folder", "--config.dataset.folder=/tmp")
  _assert_user_error(out, "is a file, not a folder")
  assert afile.read_text() == "not a folder"
  # A folder this user cannot write to (root writes anywhere but in /sys).
  read_only = "/sys/fs"
  if os.geteuid() != 0:
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
  out = _cli(read_only, "--config.dataset.source=folder", "--config.dataset.folder=/tmp")
  _assert_user_error(out, "is not writable")


def test_cli_batch_not_divisible_by_devices(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  out = _cli(tmp_path / "w", "--config.dataset.source=folder", "--config.dataset.folder=/tmp",
             "--config.batch_size=60")
  assert out.returncode == 2
  assert "global micro-batch 60 (batch_size / grad_accum_steps) is not divisible by the 8 devices" in out.stderr


def test_batch_checks_concern_only_the_jobs_that_run():
  """On 8 devices the tiny preset (evaluate.batch_size=100) is a valid pretraining config: the
  evaluation batch is rounded up to 104 (evaluation pads); a probe batch of 60 is refused for the
  probe job only, with a message naming it."""
  code = (
      "import sys; sys.path.insert(0, '.')\n"
      "from configs import cifar10_vit_t\n"
      "from mae_jax import config_check, config_lib, errors\n"
      "c = cifar10_vit_t.get_config('tiny'); c.probe.batch_size = 60\n"
      "config_check.validate(c, ('pretrain', 'finetune', 'evaluate'))\n"
      "print(config_lib.eval_batch_size(c))\n"
      "try:\n  config_check.validate(c, ('probe',))\nexcept errors.ConfigError as e:\n  print(e)\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert lines[0] == "104"
  assert lines[1] == ("invalid config: probe: the batch 60 (probe.batch_size) is not divisible by the 8 "
                      "devices; change probe.batch_size so that it is")


def test_cli_empty_image_folder(tmp_path):
  (tmp_path / "data" / "train" / "cls").mkdir(parents=True)
  out = _cli(tmp_path / "w", folder=str(tmp_path / "data"))
  assert out.returncode == 2 and "holds no images" in out.stderr and "Traceback" not in out.stderr


def test_validate_rejects_more(tmp_path):
  c = tiny_config(str(tmp_path))
  c.model.encoder_heads = 3  # 64 is not divisible by 3
  c.batch_size, c.grad_accum_steps = 64, 0
  with pytest.raises(errors.ConfigError) as e:
    config_check.validate(c)
  assert "encoder_width=64 is not divisible by model.encoder_heads=3" in str(e.value)
  assert "grad_accum_steps=0 must be >= 1" in str(e.value)
  c.model.encoder_heads, c.grad_accum_steps = 2, 1
  c.model.dtype, c.model.remat = "float16", "all"
  with pytest.raises(errors.ConfigError) as e:
    config_check.validate(c)
  assert "without loss scaling" in str(e.value) and "Use model.dtype='bfloat16'" in str(e.value)
  assert "model.remat='all' must be 'none', 'block' or 'dots'" in str(e.value)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_file_loads_and_validates(path, tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  for arg in (None, "tiny"):
    c = mod.get_config(arg)
    if c.dataset.source == "folder":
      c.dataset.folder = str(tmp_path)
    config_check.validate(c)
    assert c.dataset.image_size % c.model.patch_size == 0


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(cifar_folder, tmp_path):
  proc = _cli(tmp_path, "--config.max_steps=100000", "--config.log_every_steps=1",
              "--config.checkpoint_every_steps=100000", folder=cifar_folder, wait=False)
  deadline = time.time() + 300
  metrics = tmp_path / "metrics.jsonl"
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  assert "checkpoint saved" in out
  saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  assert len(saved) == 1 and saved[0] >= 5
  last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
  assert saved[0] == last_logged
  out = _cli(tmp_path, f"--config.max_steps={saved[0] + 3}", "--config.log_every_steps=1",
             folder=cifar_folder)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from" in out.stdout and f"step {saved[0] + 3}/{saved[0] + 3}" in out.stdout


def _wait_for_rows(proc, metrics, n, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    time.sleep(0.2)


def test_one_run_per_workdir_and_kill_9_resumes_with_every_step_once(cifar_folder, tmp_path):
  import psutil
  args = ("--config.max_steps=100000", "--config.log_every_steps=1", "--config.checkpoint_every_steps=5",
          "--config.figure_every_steps=100000")
  first = _cli(tmp_path, *args, folder=cifar_folder, wait=False)
  metrics = tmp_path / "metrics.jsonl"
  _wait_for_rows(first, metrics, 8)
  # A second run on the same workdir (another learning rate) stops at once and names the first;
  # it writes nothing (it used to resume from the first run's checkpoints and overwrite them).
  config_json = (tmp_path / "config.json").read_text()
  second = _cli(tmp_path, *args, "--config.optimizer.base_lr=0.01", folder=cifar_folder)
  _assert_user_error(second, f"is in use by another run (pid {first.pid} on ")
  assert (tmp_path / "config.json").read_text() == config_json

  # kill -9: the data-loading worker processes end with the main process.
  workers = psutil.Process(first.pid).children(recursive=True)
  assert workers
  first.kill()
  first.wait(timeout=60)  # not communicate(): a surviving worker would hold the output pipe open
  first.stdout.close()
  _, alive = psutil.wait_procs(workers, timeout=20)
  assert not alive, [p.cmdline() for p in alive]
  logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
  saved = max(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert max(logged) > saved  # steps logged after the last checkpoint, to be logged again

  # The same command resumes: the lock the killed run left is recognised as stale and taken
  # over, and the steps past the checkpoint are logged once, not twice.
  total = max(logged) + 3
  out = _cli(tmp_path, f"--config.max_steps={total}", *args[1:], folder=cifar_folder)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from {tmp_path / 'checkpoints'}/{saved}" in out.stdout
  assert f"(pid {first.pid} on " in out.stdout and "ended without releasing it" in out.stdout
  steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
  assert steps == list(range(1, total + 1))


def test_ctrl_c_to_the_process_group_saves_quietly(cifar_folder, tmp_path):
  """A terminal's Ctrl-C reaches every process of the group, the data workers too: they leave it
  to the main process, which saves and exits 130, with no traceback from anyone."""
  proc = _cli(tmp_path, "--config.max_steps=100000", "--config.log_every_steps=1",
              "--config.checkpoint_every_steps=100000", folder=cifar_folder, wait=False)
  _wait_for_rows(proc, tmp_path / "metrics.jsonl", 5)
  os.killpg(proc.pid, signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 130, out[-3000:]
  assert "checkpoint saved" in out
  assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]


def test_an_unreadable_checkpoint_is_reported_in_a_line_not_thousands(cifar_folder, tmp_path):
  """A truncated array file in the newest checkpoint: one line says which step and why, the run
  goes on from the one before (orbax's failed concurrent reads printed thousands of lines)."""
  from conftest import CHECKPOINT_DAMAGE as DAMAGE
  args = ("--config.log_every_steps=4", "--config.checkpoint_every_steps=10")
  out = _cli(tmp_path, "--config.max_steps=20", *args, folder=cifar_folder)
  assert out.returncode == 0, out.stderr[-3000:]
  DAMAGE["truncated array file"](tmp_path / "checkpoints" / "20")  # unmuted: ~3,400 lines
  out = _cli(tmp_path, "--config.max_steps=24", *args, folder=cifar_folder)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"checkpoint {tmp_path}/checkpoints/20 is unreadable (ValueError: OUT_OF_RANGE" in out.stdout
  assert f"resumed from {tmp_path}/checkpoints/10" in out.stdout and "step 24/24" in out.stdout
  assert "Traceback" not in out.stderr and len(_stderr_lines(out)) <= 2, out.stderr[-3000:]


def _aot(tmp_path, devices: int, *overrides) -> tuple[str, dict]:
  out_file = tmp_path / f"aot_{devices}_{len(overrides)}.json"
  args = [sys.executable, "-m", "mae_jax.compile", f"--config={REPO / 'configs/cifar10_vit_t.py:tiny'}",
          f"--devices={devices}", f"--output={out_file}", *overrides]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(args + ["--nosearch"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out_file.read_text())
  return out.stdout, {**r, **r["jobs"]["pretrain"]}  # the pretraining step's figures beside the machine's


def test_compile_reports_every_field_and_fsdp_bytes_fall_with_the_devices(tmp_path):
  printed, replicated = _aot(tmp_path, 8)
  for field in ("lower_s", "compile_s", "flops_per_image", "argument_bytes_per_device", "temp_bytes_per_device",
                "gradient_reductions_per_update", "collective_bytes_per_device"):
    assert f"{field}: " in printed and field in replicated
  assert "cpu:8: 8 x cpu (simulated CPU devices;" in printed and replicated["devices"] == 8
  assert f"| host {host.cpu_description()}" in printed  # the machine that compiled it
  # glibc's allocator left at its defaults: an accelerator host compiles with them.
  assert replicated["host_malloc_keeps_freed_memory"] is False
  assert replicated["micro_batch_per_device"] == 8 and replicated["gradient_reductions_per_update"] >= 1
  assert replicated["fits"] and "verdict: fits" in printed
  _, fsdp2 = _aot(tmp_path, 2, "--config.sharding.fsdp=True")
  _, fsdp8 = _aot(tmp_path, 8, "--config.sharding.fsdp=True")
  assert fsdp8["config"]["fsdp"] and fsdp8["devices"] == 8
  assert fsdp8["argument_bytes_per_device"] < fsdp2["argument_bytes_per_device"] < replicated["argument_bytes_per_device"]
  assert abs(fsdp8["flops_per_image"] - replicated["flops_per_image"]) < 1e-3 * replicated["flops_per_image"]
  # Scanned FSDP layers gather each layer's weights in the forward pass and again in the
  # backward: under twice the unrolled step's traffic. Had the partitioner gathered the
  # batch's activations instead (it did, until the blocks pinned them), 5.2x.
  _, scanned = _aot(tmp_path, 8, "--config.sharding.fsdp=True", "--config.model.scan_layers=True")
  assert fsdp8["collective_bytes_per_device"] < scanned["collective_bytes_per_device"]
  assert scanned["collective_bytes_per_device"] < 2 * fsdp8["collective_bytes_per_device"]
  # 4 micro-batches accumulated inside the step: the gradients are reduced across the devices
  # once per update (one combined all-reduce), not once per micro-batch.
  _, accumulated = _aot(tmp_path, 8, "--config.grad_accum_steps=4")
  assert accumulated["micro_batch_per_device"] == 2
  assert accumulated["gradient_reductions_per_update"] == 1
  # Per image the same model FLOPs; the one AdamW update is shared by 16 images here, not 64.
  assert 0 < accumulated["flops_per_image"] - replicated["flops_per_image"] < 1e-2 * replicated["flops_per_image"]


def test_bench_check_reports_mfu_attention_and_the_bottleneck(tmp_path, cifar_folder):
  out_file = tmp_path / "check.json"
  args = [sys.executable, "-m", "mae_jax.bench", f"--config={REPO / 'configs/cifar10_vit_t.py:tiny'}",
          "--check", "--steps=3", "--pipeline_batches=5", f"--output={out_file}",
          "--config.dataset.source=folder", f"--config.dataset.folder={cifar_folder}",
          "--config.dataset.num_workers=1"]
  out = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                       cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out_file.read_text())
  assert r["attention"] == "xla" and "measured" in r["peak_basis"] and r["peak_flops_per_s"] > 1e9
  assert 0 < r["mfu"] == pytest.approx(r["achieved_flops_per_s"] / r["peak_flops_per_s"])
  feed_bound = r["pipeline_images_per_s"] < r["images_per_s"]
  assert r["bottleneck"] == ("the host's input pipeline" if feed_bound else "the device's step")
  for line in ("train step: median", "MFU: ", "attention: xla", "bottleneck: "):
    assert line in out.stdout


@pytest.mark.parametrize("module", ["mae_jax.main", "mae_jax.probe", "mae_jax.finetune", "mae_jax.evaluate"])
def test_help_lists_the_flags_and_the_config_fields(module):
  out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO,
                       timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  for flag in ("--config:", "--workdir:", "--pretrained:", "--pretrained_step:", "--[no]distributed:"):
    assert flag in out.stdout, out.stdout
  assert "--config.model.*: " in out.stdout and "mask_ratio=0.75" in out.stdout
  assert "--config.dataset.*: " in out.stdout and "eval_split=None" in out.stdout


def test_verbosity_is_the_users_when_given():
  code = ("import sys\nfrom absl import flags, logging\nfrom mae_jax import cli\n"
          "flags.FLAGS(sys.argv)\ncli.default_verbosity()\nprint(logging.get_verbosity())\n")
  run = lambda *args: subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                                     cwd=REPO, timeout=120).stdout.split()[-1]
  assert run() == str(-1)  # WARNING: the libraries' INFO lines kept out of the run's output
  assert run("--verbosity=1") == "1"
