"""The processes of a run: one, or those `accelerate launch` started (CPU processes or one per GPU).

Work is split with accelerate's `PartialState.split_between_processes` (contiguous slices, in order)
and results come back with `accelerate.utils.gather_object` (concatenated in process order), so a
list mapped over N processes is the same list as in one process. Head search, `bench compose` and
`generate --prompts` all run this way:

    accelerate launch --multi_gpu --num_processes 2 -m attnctl headhunter ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class Processes:
    """This process's place in the run (`index` of `count`; `is_main` writes the results) and its device."""

    def __init__(self) -> None:
        from accelerate import PartialState

        # Without CUDA, `accelerate launch --multi_gpu` starts gloo CPU processes only for cpu=True.
        self.state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def index(self) -> int:
        """This process's index, 0 to count - 1."""
        return self.state.process_index

    @property
    def count(self) -> int:
        """The number of processes."""
        return self.state.num_processes

    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes reports and result files."""
        return self.state.is_main_process

    @property
    def device(self) -> torch.device:
        """The device this process runs on."""
        return self.state.device

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's contiguous slice of `items` (all of them in a single process)."""
        with self.state.split_between_processes(list(items)) as part:
            return list(part)

    def gather(self, items: Sequence[T]) -> list[T]:
        """Every process's `items`, concatenated in process order, on every process."""
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def to_device(self, pipe: Any) -> Any:
        """The pipeline on this process's device (one GPU per process under `accelerate launch`)."""
        return pipe if self.device.type == "cpu" else pipe.to(self.device)


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    """This run's processes for the lifetime of a command. At the end every process waits for the
    others and the process group is closed: without that, gloo processes abort at exit about half the
    time. After an error the group is closed without waiting (the launcher stops the others)."""
    procs = Processes()
    try:
        yield procs
        procs.state.wait_for_everyone()
    finally:
        procs.state.destroy_process_group()
