"""Where each stage reads and writes, derived from ``config.paths`` (architecture.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attnrl.config.schema import RunConfig


# An output check sees a stage's complete output at a temporary path, before it replaces the previous
# output; raising keeps the previous output (the data-check gates plug in here).
OutputCheck = Callable[[Path], None]
TRAIN_FILE = "train.parquet"
CHECKPOINTS_DIR = "checkpoints"  # under a training run's directory: step_*/ (attnrl.training.checkpoint)


def eval_file(benchmark: str) -> str:
    """A benchmark's file, relative to the prepared-data directory."""
    return f"eval/{benchmark}.parquet"


@dataclass(frozen=True)
class Layout:
    root: Path
    data_dir: Path
    models_dir: Path
    runs_dir: Path
    reports_dir: Path

    @classmethod
    def of(cls, config: RunConfig, root: str | Path = ".") -> Layout:
        root = Path(root)
        return cls(
            root=root,
            data_dir=root / config.paths.data_dir,
            models_dir=root / config.paths.models_dir,
            runs_dir=root / config.paths.runs_dir,
            reports_dir=root / config.paths.reports_dir,
        )

    @property
    def prepared_dir(self) -> Path:
        return self.data_dir / "prepared"

    @property
    def prepared_train(self) -> Path:
        return self.prepared_dir / TRAIN_FILE

    def prepared_eval(self, benchmark: str) -> Path:
        """One file per configured benchmark, so each keeps its own K (spec §14)."""
        return self.prepared_dir / eval_file(benchmark)

    @property
    def difficulty_dir(self) -> Path:
        return self.data_dir / "difficulty"

    @property
    def init_model(self) -> Path:
        return self.models_dir / "init"

    @property
    def train_dir(self) -> Path:
        return self.runs_dir / "train"

    @property
    def eval_dir(self) -> Path:
        return self.runs_dir / "eval"

    def data_docs(self, config: RunConfig) -> Path:
        """Great Expectations Data Docs of the data checks (``checks.data_docs_dir``)."""
        return self.root / config.checks.data_docs_dir
