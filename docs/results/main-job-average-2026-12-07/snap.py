"""Run the main job (run.py's MAIN_JOB) with the eval model's state saved at every epoch end."""
import sys, copy, torch
sys.path.insert(0, "/work/main")
import run as runpy_
from examples.engine import trainer as T
from examples.engine.run import main

orig = T.FoldTrainer._end_epoch
def end_epoch(self, epoch, stats, log):
    val = orig(self, epoch, stats, log)
    torch.save({k: v.detach().clone() for k, v in self.eval_model.state_dict().items()}, self.out_dir / f"snap{epoch + 1:02d}.pt")
    return val
T.FoldTrainer._end_epoch = end_epoch
sys.exit(main(runpy_.MAIN_JOB[2:] + sys.argv[1:]))
