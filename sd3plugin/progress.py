"""Progress bars with an estimate (tqdm) for the long steps of the apps: building a random-weight
pipeline and writing it to disk. Loading and the denoising steps (warm-up with compilation included) show
diffusers' own bars, named by ``step_bar(pipe, desc)``."""
from __future__ import annotations

from tqdm.auto import tqdm


class BuildProgress:
    """Parameters drawn, then parameters written, per component of a random-weight pipeline."""

    def __init__(self, arch: str, counts: dict[str, int], **tqdm_kwargs):
        self.arch = arch
        self.counts = counts
        self.tqdm_kwargs = tqdm_kwargs
        self.bar = None

    def _open(self, desc: str) -> None:
        self.close()
        self.bar = tqdm(total=sum(self.counts.values()), unit="param", unit_scale=True, desc=desc,
                        **self.tqdm_kwargs)

    def __enter__(self) -> "BuildProgress":
        self._open(f"building random-weight {self.arch}")
        return self

    def built(self, name: str) -> None:
        self.bar.set_postfix_str(f"{name} drawn", refresh=False)
        self.bar.update(self.counts.get(name, 0))

    def writing(self) -> None:
        self._open(f"writing {self.arch} to disk")

    def written(self, name: str) -> None:
        self.bar.set_postfix_str(f"{name} written", refresh=False)
        self.bar.update(self.counts.get(name, 0))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __exit__(self, *exc) -> None:
        self.close()


def step_bar(pipe, desc: str) -> None:
    """Name the pipeline's denoising-step bar (tqdm's estimate included) for the next call."""
    pipe.set_progress_bar_config(desc=desc)
