"""Config: conf/ defaults + a user's model.yaml + overrides -> validated dataclasses.

The only package that knows Hydra (kvc.config.compose). Precedence, lowest first: the packaged defaults
(`kvc.conf`), the user's model.yaml, then override strings (`hardware=h100-pcie5`,
`hardware.h2d_gbps=40`). Hydra is composed in its context-manager form and any Hydra the
host application had initialised is put back afterwards.
"""
from __future__ import annotations

from kvc.config.compose import group_options, load_config
from kvc.config.schema import (
    GROUPS,
    LIMITS,
    MAX_DEPTH,
    MAX_OVERRIDE_CHARS,
    MAX_OVERRIDES,
    MAX_YAML_BYTES,
    Config,
    ModelConfig,
    ParallelConfig,
    ScheduleConfig,
    WorkloadConfig,
)
from kvc.config.validate import check_fits_model, check_hardware, from_dict, hardware_from_dict
from kvc.config.yaml_safe import load_yaml, read_text_capped

__all__ = ["GROUPS", "LIMITS", "MAX_DEPTH", "MAX_OVERRIDES", "MAX_OVERRIDE_CHARS", "MAX_YAML_BYTES",
           "Config", "ModelConfig", "ParallelConfig", "ScheduleConfig", "WorkloadConfig", "check_fits_model",
           "check_hardware", "from_dict", "group_options", "hardware_from_dict", "load_config",
           "load_yaml", "read_text_capped"]
