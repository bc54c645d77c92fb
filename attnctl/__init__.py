"""attnctl: precise control over attention in diffusers pipelines.

with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])) as ctl:
    image = pipe("a cat and a frog").images[0]
ctl.maps["cat"]  # [h, w]

result = attnctl.generate(pipe, "a cat and a frog", [attnctl.AttentionMaps(["cat"])], seed=0)
result.image, result.maps["cat"], result.heatmaps()
"""

from . import headhunter
from .core.controls import Control
from .core.layers import LayerSelection
from .core.session import Session, control
from .pipelines.generate import Generation, generate
from .processors.draft import DraftAttention
from .processors.guidance import AStar, AttendAndExcite
from .processors.layout import Layout, Region
from .processors.maps import AttentionMaps
from .processors.regulation import AttentionRegulation, AttentionRegulationProcessor
from .processors.softpag import PAG, SoftPAG

__all__ = [
    "AStar",
    "AttendAndExcite",
    "AttentionMaps",
    "AttentionRegulation",
    "AttentionRegulationProcessor",
    "Control",
    "DraftAttention",
    "Generation",
    "LayerSelection",
    "Layout",
    "PAG",
    "Region",
    "Session",
    "SoftPAG",
    "control",
    "generate",
    "headhunter",
]
__version__ = "0.1.0"

_LAZY_SUBMODULES = ("testbed", "tiny")  # imported on first access: `import attnctl` stays light


def __getattr__(name: str) -> object:
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
