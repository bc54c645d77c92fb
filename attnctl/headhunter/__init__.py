"""HeadHunter: greedy search for the attention heads whose perturbation guides best (Ahn et al.,
NeurIPS 2025), its objectives, and the multi-process runs (accelerate) that the search,
`bench compose` and `generate --prompts` share.

result = attnctl.headhunter.search(pipe, prompts, attnctl.headhunter.testbed, samples=16, rounds=2,
                                   top_k=4, out="heads.json")
attnctl.SoftPAG(heads="heads.json", top=4)
"""

from .distributed import Processes, processes
from .greedy import SEARCH_SEED, candidate_heads, greedy, search, weights_checksum
from .objectives import ClipScore, Objective, objective_from_name, objective_name, testbed

__all__ = [
    "SEARCH_SEED",
    "ClipScore",
    "Objective",
    "Processes",
    "candidate_heads",
    "greedy",
    "objective_from_name",
    "objective_name",
    "processes",
    "search",
    "testbed",
    "weights_checksum",
]
