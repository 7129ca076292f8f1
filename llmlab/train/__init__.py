"""The shared training machinery: one loop, its config, LR schedules, checkpoints and process-group helpers."""
from .checkpoint import Checkpoint, list_checkpoints, load_checkpoint, load_latest, save_checkpoint
from .dist import barrier, cleanup, init_distributed, is_main
from .loop import TrainConfig, make_optimizer, param_groups, train
from .schedule import lr_at

__all__ = ["Checkpoint", "TrainConfig", "barrier", "cleanup", "init_distributed", "is_main", "list_checkpoints",
           "load_checkpoint", "load_latest", "lr_at", "make_optimizer", "param_groups", "save_checkpoint", "train"]
