"""One typed configuration for a whole run; ``params.yaml`` is its serialisation."""

from attnrl.config.loading import dump_config, load_config, resolve_config
from attnrl.config.presets import METHODS, PRESETS
from attnrl.config.schema import RunConfig

__all__ = ["METHODS", "PRESETS", "RunConfig", "dump_config", "load_config", "resolve_config"]
