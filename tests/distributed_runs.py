"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2`: several tiny training runs in one launch
(a launch costs more than the runs), each exactly as `ditk train` makes it (train_in_run_dir).

usage: python -m torch.distributed.run --nproc_per_node 2 tests/distributed_runs.py ROOT NAME:STEPS:KEY=VALUE,... ...
"""

import sys
from pathlib import Path

from ditk_testing import TINY


def main(root: str, *runs: str) -> None:
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    from ditk.config import resolve
    from ditk.train import train_in_run_dir

    # One process group for every run of the launch: the loop's accelerator.end_training() would destroy it,
    # and a second gloo group set up from the same rendezvous store can meet the first one's stale addresses.
    destroy, dist.destroy_process_group = dist.destroy_process_group, lambda group=None: None
    try:
        for spec in runs:
            name, steps, extra = (spec.split(":", 2) + [""])[:3]
            AcceleratorState._reset_state(reset_partial_state=True)  # as in a fresh launch (the group is reused)
            cfg = resolve("digits-dit", [*TINY, f"train.max_steps={steps}", f"run.name={name}", f"run.dir={root}",
                                         *[kv for kv in extra.split(",") if kv]])
            code = train_in_run_dir(cfg, Path(root) / name, None, progress=False)
            assert code == 0, (spec, code)
    finally:
        destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
