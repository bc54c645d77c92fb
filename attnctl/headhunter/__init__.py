"""HeadHunter: greedy search for the attention heads whose perturbation guides best (Ahn et al.,
NeurIPS 2025), and the multi-process runs (accelerate) that the search, `bench compose` and
`generate --prompts` share."""

from .distributed import Processes, processes

__all__ = ["Processes", "processes"]
