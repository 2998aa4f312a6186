"""Run a study: `python -m mae_jax.sweep --config=configs/ablations/mask_ratio.py --workdir=runs/mask_ratio`.

A study config is a normal config plus a `sweep` section: a list of runs, each a label and the
config fields it changes, and the jobs to run for each (pretrain, then probe / finetune /
evaluate on the pretrained encoder). Runs go one after another, each in `workdir/<label>/<job>`;
a finished job (its results file exists) is skipped, an interrupted one resumes from its
checkpoint, so the same command can be run again at any time. `--run=LABEL` runs one run only
(separate launches, e.g. a SLURM array); `--report` only collects. After the runs it writes:

  results.csv    one row per run: the swept fields, FLOPs, and every job's numbers
  results.md     the same as a Markdown table, in the layout of the paper's ablation tables
  <metric>.png   the study's metric against the swept value
  loss_curves.png  all runs' pretraining loss curves in one figure
"""

import sys

from absl import flags
from ml_collections import config_flags

from mae_jax import cli
from mae_jax.tools.sweep import run

config_flags.DEFINE_config_file("config", None, "Study config (configs/ablations/*.py[:tiny]).")
flags.DEFINE_string("workdir", None, "The study's folder: one sub-folder per run, and the reports.")
flags.DEFINE_string("run", "", "Run only this label (separate launches); the reports cover all.")
flags.DEFINE_bool("report", False, "Only collect finished results and write the reports.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  cli.default_verbosity()
  if "sweep" not in flags.FLAGS.config:
    cli.fail("--config is not a study (it has no 'sweep' section); give one of configs/ablations/*.py")
  study = cli.prepare(flags.FLAGS.config, jobs=flags.FLAGS.config.sweep.jobs)
  return cli.run_guarded(lambda: run(study, flags.FLAGS.workdir, flags.FLAGS.run, flags.FLAGS.report))


if __name__ == "__main__":
  sys.exit(cli.run_app(main))
