"""Diagnostic: Attend-and-Excite and A-STAR at smaller step sizes than the papers' 20 on the testbed.

The papers tuned `scale` = 20 on SD's 4x64x64 latent; the bundled model's latent is 4x16x16. The
same prompts and seeds as `attnctl bench compose --sizes 2,3 --num-prompts 6 --seeds 2` (24 samples per
method), all methods run on each sample in turn.

    python benchmarks/compose_step_size.py   # writes benchmarks/results/compose_step_size.json
"""

import torch

import attnctl
from attnctl.testbed import bench


def main() -> None:
    torch.set_num_threads(1)
    shapes = bench._shapes
    bench.METHODS.update(
        {
            "excite_s5": lambda p: [attnctl.AttendAndExcite(shapes(p), scale=5.0)],
            "excite_s2": lambda p: [attnctl.AttendAndExcite(shapes(p), scale=2.0)],
            "astar_s2": lambda p: [attnctl.AStar(shapes(p), scale=2.0)],
        }
    )
    report = bench.run_compose(
        ["none", "excite", "excite_s5", "excite_s2", "astar", "astar_s2"],
        n_prompts=6,
        n_seeds=2,
        sizes=(2, 3),
        log=None,
        json_out="benchmarks/results/compose_step_size.json",
    )
    print(bench.format_table(report))


if __name__ == "__main__":
    main()
