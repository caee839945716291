"""One rank of the 2-process DDP test (tests/test_ddp.py), started by torchrun.

argv[1] is a JSON list of jobs {params, run_dir, records, base, family, weights}; each job trains
and every rank writes the trainable weights it ended with to `weights` % rank, so the test
can check that the ranks stayed in step. The process group is created here with cpu=True:
on a machine without a GPU, accelerate only picks gloo (MULTI_CPU) when told it runs on CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from dbkit import train


def main(jobs_file: str) -> None:
    state = PartialState(cpu=True)
    assert state.num_processes == 2 and state.backend == "gloo", (state.num_processes, state.backend)
    loaded: list[dict] = []
    load_parts = train.load_parts

    def keep(*args, **kwargs) -> train.Parts:  # train() drops its modules on return: keep a handle
        parts = load_parts(*args, **kwargs)
        loaded.append({"unet": parts.unet, **dict(zip(parts.te_names, parts.text_encoders))})
        return parts

    train.load_parts = keep
    for job in json.loads(Path(jobs_file).read_text()):
        loaded.clear()
        train.train(job["params"], Path(job["run_dir"]), job["records"], base_path=Path(job["base"]),
                    family=job["family"], progress=False)
        torch.save(train.trainable_state(loaded[0]), job["weights"] % state.process_index)


if __name__ == "__main__":
    main(sys.argv[1])
