"""Does pretraining pay? The label-efficiency study:
`python -m mae_jax.study --config=configs/studies/cifar10_label_efficiency.py --workdir=runs/label_efficiency`.

One MAE pretraining on the train split (labels unused), then, at each fraction of the labels
(`study.labels`: a class-balanced subset per seed, `dataset.label_fraction`):
  * fine-tuning from the MAE encoder and, with the identical recipe, steps and seeds, from a
    random initialisation (the from-scratch baseline);
  * a linear probe on the MAE encoder and on a random one;
  * kNN top-1 with the labelled subset as the memory, MAE encoder and random one;
and, along pretraining, the same probe, kNN and fine-tuning (at `study.along_fraction`) from the
checkpoints kept every `keep_checkpoint_every_epochs` (`study.along_epochs`).

Every part runs in `workdir/<part>/`; a finished part (its results.json) is skipped and an
interrupted one resumes from its checkpoint, so the same command may be run again at any time,
or with `--part=NAME[,NAME]` for some parts only (`--list` names them all). After the parts it
writes results.md (the tables), results.json (every part's figures and wall time), labels.png
(accuracy against labels, MAE against scratch) and pretraining.png (accuracy against
pretraining epoch); `--report` writes them from what is finished.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from mae_jax import cli
from mae_jax.tools.study import parts, run


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Study config (configs/studies/*.py[:tiny]).")
  flags.DEFINE_string("workdir", None, "The study's folder: one sub-folder per part, and the reports.")
  flags.DEFINE_list("part", [], "Run only these parts (comma-separated names; --list shows them).")
  flags.DEFINE_bool("list", False, "Print the parts of the study and whether each is done, then stop.")
  flags.DEFINE_bool("report", False, "Only collect finished parts and write the reports.")
  cli.define_distributed_flags()
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  cli.default_verbosity()
  f = flags.FLAGS
  if "study" not in f.config:
    cli.fail("--config is not a label-efficiency study (it has no 'study' section); give "
             "configs/studies/cifar10_label_efficiency.py")
  study = cli.prepare(f.config, jobs=("pretrain", "probe", "finetune"))
  if f.list:
    for p in parts(study):
      done = os.path.exists(os.path.join(f.workdir, p.name, "results.json"))
      print(f"{'done ' if done else '     '} {p.name}")
    return 0
  return cli.run_guarded(lambda: run(study, f.workdir, tuple(f.part), f.report))


if __name__ == "__main__":
  define_flags()
  sys.exit(cli.run_app(main))
