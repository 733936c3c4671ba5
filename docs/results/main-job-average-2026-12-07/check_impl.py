"""The trainer's --select average path, fed the snapshots of a snap run: its test Dice."""
import sys, torch
sys.path.insert(0, "/work/main")
import run as runpy_
from pathlib import Path
from examples.engine.arguments import config_for, parse_args
from examples.data.folds import fold_data, open_dataset, split_file
from examples.engine.trainer import FoldTrainer
from examples.engine.run import build_model
from examples.engine.evaluate import evaluate
run_dir, seed, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
args = parse_args(runpy_.MAIN_JOB[2:] + ["--seed", str(seed), "--out", "/tmp/probe/out2", "--split", str(run_dir / "splits.json"),
                                         "--select", "average", "--average-epochs", str(n)])
for method in ("suponly", "cscpa"):
    cfg = config_for(args, method, 0)
    data = fold_data(open_dataset(cfg), split_file(cfg, True), cfg)
    torch.manual_seed(seed)
    tr = FoldTrainer(cfg, data, build_model(cfg), Path("/tmp/probe/out2") / method, torch.device("cpu"))
    tr.out_dir.mkdir(parents=True, exist_ok=True)
    for e in range(cfg.epochs - n + 1, cfg.epochs + 1):
        tr.eval_model.load_state_dict(torch.load(run_dir / method / "fold0" / f"snap{e:02d}.pt"))
        tr.epoch_average.add(tr.eval_model)
    m = tr._averaged_model(print)
    ev = evaluate(m, data.test, torch.device("cpu"))
    with open(run_dir / method / "fold0" / "average_test_scores.csv", "w") as h:
        h.write("id,dice,iou\n" + "".join(f'"{s.id}",{s.dice:.6f},{s.iou:.6f}\n' for s in ev.scores))
    print(method, "test", round(ev.dice, 4), flush=True)
